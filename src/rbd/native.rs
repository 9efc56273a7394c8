//! librados and librbd in process, for the calls of an instance disk's life (the parent's size,
//! its last-use mark, clone, resize, remove, the cluster's fsid): one connection per run instead
//! of one `rbd` process (and its own connection) per call.
//!
//! The libraries are loaded when first needed (`dlopen` of `librados.so.2` and `librbd.so.1`,
//! which ceph-common depends on), so building imgcache needs no Ceph headers or libraries and a
//! host without them uses the `rbd` CLI. `IMGCACHE_LIBRBD=off` uses the CLI for everything, and so
//! does a test double named by `IMGCACHE_RBD` or an identity given in `CEPH_ARGS` (which only the
//! CLI's argument parsing reads).

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::path::PathBuf;
use std::time::Duration;

use libloading::Library;

/// errno of a failed call (positive), and what was called.
#[derive(Debug, Clone)]
pub struct Failure {
    pub call: String,
    pub errno: i32,
}

impl Failure {
    fn new(call: String, r: c_int) -> Failure {
        Failure {
            call,
            errno: r.saturating_neg(),
        }
    }

    fn invalid(what: String) -> Failure {
        Failure {
            call: what,
            errno: libc::EINVAL,
        }
    }

    /// The C library's text for the errno.
    pub fn text(&self) -> String {
        std::io::Error::from_raw_os_error(self.errno).to_string()
    }
}

type Rados = *mut c_void;
type Ioctx = *mut c_void;
type Image = *mut c_void;
type Opts = *mut c_void;
type Progress = unsafe extern "C" fn(u64, u64, *mut c_void) -> c_int;

/// The functions used, resolved once from the loaded libraries. Loaded once per process and
/// never unloaded: `dlclose` of C++ libraries that started threads is not safe to rely on.
struct Api {
    create2: unsafe extern "C" fn(*mut Rados, *const c_char, *const c_char, u64) -> c_int,
    conf_read_file: unsafe extern "C" fn(Rados, *const c_char) -> c_int,
    conf_parse_env: unsafe extern "C" fn(Rados, *const c_char) -> c_int,
    conf_set: unsafe extern "C" fn(Rados, *const c_char, *const c_char) -> c_int,
    connect: unsafe extern "C" fn(Rados) -> c_int,
    shutdown: unsafe extern "C" fn(Rados),
    cluster_fsid: unsafe extern "C" fn(Rados, *mut c_char, usize) -> c_int,
    ioctx_create: unsafe extern "C" fn(Rados, *const c_char, *mut Ioctx) -> c_int,
    ioctx_destroy: unsafe extern "C" fn(Ioctx),
    ioctx_set_namespace: unsafe extern "C" fn(Ioctx, *const c_char),
    open: unsafe extern "C" fn(Ioctx, *const c_char, *mut Image, *const c_char) -> c_int,
    open_read_only: unsafe extern "C" fn(Ioctx, *const c_char, *mut Image, *const c_char) -> c_int,
    close: unsafe extern "C" fn(Image) -> c_int,
    get_size: unsafe extern "C" fn(Image, *mut u64) -> c_int,
    resize2: unsafe extern "C" fn(Image, u64, bool, Progress, *mut c_void) -> c_int,
    metadata_set: unsafe extern "C" fn(Image, *const c_char, *const c_char) -> c_int,
    clone3: unsafe extern "C" fn(
        Ioctx,
        *const c_char,
        *const c_char,
        Ioctx,
        *const c_char,
        Opts,
    ) -> c_int,
    remove: unsafe extern "C" fn(Ioctx, *const c_char) -> c_int,
    opts_create: unsafe extern "C" fn(*mut Opts),
    opts_destroy: unsafe extern "C" fn(Opts),
    // Kept (in the process-wide static) so the pointers above stay valid.
    _rbd: Library,
    _rados: Library,
}

/// The libraries, loaded on first use; `None` if they cannot be (no ceph-common).
fn api() -> Option<&'static Api> {
    static API: std::sync::OnceLock<Option<Api>> = std::sync::OnceLock::new();
    API.get_or_init(|| Api::load().ok()).as_ref()
}

impl Api {
    /// Loads both libraries, or says why not.
    fn load() -> Result<Api, String> {
        // SAFETY: loading the system's librados/librbd runs their initialisers, which only set
        // up their own state (no process-wide side effects imgcache depends on).
        let rados = unsafe { Library::new("librados.so.2") }.map_err(|e| e.to_string())?;
        // SAFETY: as above.
        let rbd = unsafe { Library::new("librbd.so.1") }.map_err(|e| e.to_string())?;
        macro_rules! sym {
            ($lib:expr, $name:literal) => {
                // SAFETY: the type is the function's C prototype from librados.h / librbd.h
                // (Ceph 14 and later), and the library outlives the pointer (see `Api`).
                *unsafe { $lib.get(concat!($name, "\0").as_bytes()) }
                    .map_err(|e| format!("{}: {e}", $name))?
            };
        }
        Ok(Api {
            create2: sym!(rados, "rados_create2"),
            conf_read_file: sym!(rados, "rados_conf_read_file"),
            conf_parse_env: sym!(rados, "rados_conf_parse_env"),
            conf_set: sym!(rados, "rados_conf_set"),
            connect: sym!(rados, "rados_connect"),
            shutdown: sym!(rados, "rados_shutdown"),
            cluster_fsid: sym!(rados, "rados_cluster_fsid"),
            ioctx_create: sym!(rados, "rados_ioctx_create"),
            ioctx_destroy: sym!(rados, "rados_ioctx_destroy"),
            ioctx_set_namespace: sym!(rados, "rados_ioctx_set_namespace"),
            open: sym!(rbd, "rbd_open"),
            open_read_only: sym!(rbd, "rbd_open_read_only"),
            close: sym!(rbd, "rbd_close"),
            get_size: sym!(rbd, "rbd_get_size"),
            resize2: sym!(rbd, "rbd_resize2"),
            metadata_set: sym!(rbd, "rbd_metadata_set"),
            clone3: sym!(rbd, "rbd_clone3"),
            remove: sym!(rbd, "rbd_remove"),
            opts_create: sym!(rbd, "rbd_image_options_create"),
            opts_destroy: sym!(rbd, "rbd_image_options_destroy"),
            _rbd: rbd,
            _rados: rados,
        })
    }
}

/// How to reach the cluster (the `Rbd` settings).
pub struct Settings<'a> {
    pub conf: Option<&'a PathBuf>,
    pub id: Option<&'a str>,
    pub keyring: Option<&'a PathBuf>,
    pub timeout: Duration,
}

/// Whether this run may use librbd at all (before loading anything).
pub fn wanted() -> bool {
    let off = std::env::var("IMGCACHE_LIBRBD").is_ok_and(|v| v == "off" || v == "0");
    let double = std::env::var_os("IMGCACHE_RBD").is_some_and(|v| !v.is_empty());
    !off && !double && !names_identity(&std::env::var("CEPH_ARGS").unwrap_or_default())
}

/// True if `CEPH_ARGS` names the client (`--id`, `--user`, `--name`, `-i`, `-n`): the CLI reads
/// those from its argument parser, librados' environment parsing does not.
fn names_identity(args: &str) -> bool {
    args.split_whitespace().any(|a| {
        let flag = a.split('=').next().unwrap_or(a);
        matches!(flag, "--id" | "--user" | "--name" | "-i" | "-n")
    })
}

/// A connected cluster handle.
pub struct Conn {
    api: &'static Api,
    cluster: Rados,
}

// SAFETY: librados cluster handles and the calls made on them are thread-safe (librados.h:
// "the rados_t ... may be used concurrently"); `Conn` owns the handle and frees it once.
unsafe impl Send for Conn {}
// SAFETY: as above; no method mutates Rust-side state.
unsafe impl Sync for Conn {}

/// `pool[/namespace]/image[@snap]`, split.
struct Spec {
    pool: CString,
    namespace: Option<CString>,
    image: CString,
    snap: Option<CString>,
}

fn cstr(s: &str) -> Result<CString, Failure> {
    CString::new(s).map_err(|_| Failure::invalid(format!("name {s:?}")))
}

fn spec(s: &str) -> Result<Spec, Failure> {
    let (path, snap) = match s.split_once('@') {
        Some((p, snap)) => (p, Some(cstr(snap)?)),
        None => (s, None),
    };
    let parts: Vec<&str> = path.split('/').collect();
    let (pool, namespace, image) = match parts.as_slice() {
        [pool, image] => (*pool, None, *image),
        [pool, ns, image] => (*pool, Some(cstr(ns)?), *image),
        _ => return Err(Failure::invalid(format!("image spec {s:?}"))),
    };
    if pool.is_empty() || image.is_empty() {
        return Err(Failure::invalid(format!("image spec {s:?}")));
    }
    Ok(Spec {
        pool: cstr(pool)?,
        namespace,
        image: cstr(image)?,
        snap,
    })
}

/// An open pool context, destroyed on drop.
struct PoolCtx<'c> {
    conn: &'c Conn,
    io: Ioctx,
}

impl Drop for PoolCtx<'_> {
    fn drop(&mut self) {
        // SAFETY: `io` came from rados_ioctx_create and is destroyed once, here.
        unsafe { (self.conn.api.ioctx_destroy)(self.io) }
    }
}

/// An open image, closed on drop.
struct Open<'c> {
    conn: &'c Conn,
    image: Image,
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        // SAFETY: `image` came from rbd_open* and is closed once, here.
        unsafe { (self.conn.api.close)(self.image) };
    }
}

unsafe extern "C" fn no_progress(_: u64, _: u64, _: *mut c_void) -> c_int {
    0
}

impl Conn {
    /// Loads the libraries and connects. `Ok(None)`: the libraries are not there (use the CLI).
    pub fn connect(s: &Settings<'_>) -> Result<Option<Conn>, Failure> {
        let Some(api) = api() else {
            return Ok(None);
        };
        let mut cluster: Rados = std::ptr::null_mut();
        let name = cstr(&format!("client.{}", s.id.unwrap_or("admin")))?;
        let ceph = cstr("ceph")?;
        // SAFETY: out-pointer to a local; both strings are NUL-terminated and outlive the call.
        let r = unsafe { (api.create2)(&mut cluster, ceph.as_ptr(), name.as_ptr(), 0) };
        if r < 0 {
            return Err(Failure::new("rados_create2".into(), r));
        }
        // From here `conn` owns the handle: every early return shuts it down.
        let conn = Conn { api, cluster };
        let conf = s.conf.map(|p| cstr(&p.to_string_lossy())).transpose()?;
        // NULL: Ceph's own search ($CEPH_CONF, /etc/ceph/ceph.conf, ~/.ceph/config, ./ceph.conf).
        let conf_ptr = conf.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
        // SAFETY: a live handle; `conf_ptr` is NULL or a NUL-terminated string alive here.
        let r = unsafe { (conn.api.conf_read_file)(conn.cluster, conf_ptr) };
        if r < 0 {
            let what = s.conf.map_or("the default Ceph configuration".into(), |p| {
                p.display().to_string()
            });
            return Err(Failure::new(format!("reading {what}"), r));
        }
        // SAFETY: a live handle; NULL reads CEPH_ARGS.
        let r = unsafe { (conn.api.conf_parse_env)(conn.cluster, std::ptr::null()) };
        if r < 0 {
            return Err(Failure::new("parsing CEPH_ARGS".into(), r));
        }
        let secs = s.timeout.as_secs().max(1).to_string();
        let mut options = vec![
            ("client_mount_timeout", secs.clone()),
            ("rados_mon_op_timeout", secs.clone()),
            ("rados_osd_op_timeout", secs),
            // Failures come back as errno and are reported by imgcache; the library's own
            // lines on stderr would only interleave with its output.
            ("log_to_stderr", "false".into()),
            ("err_to_stderr", "false".into()),
        ];
        if let Some(k) = s.keyring {
            options.push(("keyring", k.to_string_lossy().into_owned()));
        }
        for (key, value) in &options {
            conn.set(key, value)?;
        }
        // SAFETY: a live, configured handle.
        let r = unsafe { (conn.api.connect)(conn.cluster) };
        if r < 0 {
            return Err(Failure::new("connecting to the cluster".into(), r));
        }
        Ok(Some(conn))
    }

    fn set(&self, key: &str, value: &str) -> Result<(), Failure> {
        let (k, v) = (cstr(key)?, cstr(value)?);
        // SAFETY: a live handle and two NUL-terminated strings alive for the call.
        let r = unsafe { (self.api.conf_set)(self.cluster, k.as_ptr(), v.as_ptr()) };
        if r < 0 {
            return Err(Failure::new(format!("setting {key}"), r));
        }
        Ok(())
    }

    /// The cluster's fsid.
    pub fn fsid(&self) -> Result<String, Failure> {
        let mut buf = [0 as c_char; 64];
        // SAFETY: a live handle; the buffer and its length match.
        let r = unsafe { (self.api.cluster_fsid)(self.cluster, buf.as_mut_ptr(), buf.len()) };
        if r < 0 {
            return Err(Failure::new("rados_cluster_fsid".into(), r));
        }
        // SAFETY: on success the buffer holds a NUL-terminated fsid (36 characters < 64).
        let fsid = unsafe { CStr::from_ptr(buf.as_ptr()) };
        Ok(fsid.to_string_lossy().into_owned())
    }

    fn pool(&self, s: &Spec) -> Result<PoolCtx<'_>, Failure> {
        let mut io: Ioctx = std::ptr::null_mut();
        // SAFETY: a live handle, a NUL-terminated pool name, an out-pointer to a local.
        let r = unsafe { (self.api.ioctx_create)(self.cluster, s.pool.as_ptr(), &mut io) };
        if r < 0 {
            return Err(Failure::new(
                format!("opening pool {}", s.pool.to_string_lossy()),
                r,
            ));
        }
        let ctx = PoolCtx { conn: self, io };
        if let Some(ns) = &s.namespace {
            // SAFETY: a live context and a NUL-terminated namespace.
            unsafe { (self.api.ioctx_set_namespace)(ctx.io, ns.as_ptr()) };
        }
        Ok(ctx)
    }

    fn open<'c>(&'c self, io: &PoolCtx<'c>, s: &Spec, write: bool) -> Result<Open<'c>, Failure> {
        let mut image: Image = std::ptr::null_mut();
        let snap = s.snap.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
        let f = if write {
            self.api.open
        } else {
            self.api.open_read_only
        };
        // SAFETY: a live pool context, NUL-terminated names (snap may be NULL), out-pointer.
        let r = unsafe { f(io.io, s.image.as_ptr(), &mut image, snap) };
        if r < 0 {
            return Err(Failure::new(format!("opening {}", show(s)), r));
        }
        Ok(Open { conn: self, image })
    }

    /// Size of an image or snapshot in bytes; `None` if it does not exist.
    pub fn size(&self, spec_str: &str) -> Result<Option<u64>, Failure> {
        let s = spec(spec_str)?;
        // A missing pool is a missing image, as for `rbd info`.
        let io = match self.pool(&s) {
            Ok(io) => io,
            Err(f) if f.errno == libc::ENOENT => return Ok(None),
            Err(f) => return Err(f),
        };
        let image = match self.open(&io, &s, false) {
            Ok(i) => i,
            Err(f) if f.errno == libc::ENOENT => return Ok(None),
            Err(f) => return Err(f),
        };
        let mut size = 0u64;
        // SAFETY: an open image and an out-pointer to a local.
        let r = unsafe { (self.api.get_size)(image.image, &mut size) };
        if r < 0 {
            return Err(Failure::new(format!("size of {spec_str}"), r));
        }
        Ok(Some(size))
    }

    /// Sets one metadata key of an image.
    pub fn metadata_set(&self, spec_str: &str, key: &str, value: &str) -> Result<(), Failure> {
        let s = spec(spec_str)?;
        let io = self.pool(&s)?;
        let image = self.open(&io, &s, true)?;
        let (k, v) = (cstr(key)?, cstr(value)?);
        // SAFETY: an open image and two NUL-terminated strings alive for the call.
        let r = unsafe { (self.api.metadata_set)(image.image, k.as_ptr(), v.as_ptr()) };
        if r < 0 {
            return Err(Failure::new(format!("setting {key} on {spec_str}"), r));
        }
        Ok(())
    }

    /// Clones `parent` (`pool/image@snap`) as `child` (`pool/image`), with the cluster's
    /// default options (what `rbd clone` without options does).
    pub fn clone_image(&self, parent: &str, child: &str) -> Result<(), Failure> {
        let (p, c) = (spec(parent)?, spec(child)?);
        let Some(snap) = &p.snap else {
            return Err(Failure::invalid(format!(
                "clone parent {parent:?} (no snapshot)"
            )));
        };
        let (pio, cio) = (self.pool(&p)?, self.pool(&c)?);
        let mut opts: Opts = std::ptr::null_mut();
        // SAFETY: out-pointer to a local; destroyed below.
        unsafe { (self.api.opts_create)(&mut opts) };
        // SAFETY: live contexts, NUL-terminated names, options just created.
        let r = unsafe {
            (self.api.clone3)(
                pio.io,
                p.image.as_ptr(),
                snap.as_ptr(),
                cio.io,
                c.image.as_ptr(),
                opts,
            )
        };
        // SAFETY: created above, destroyed once.
        unsafe { (self.api.opts_destroy)(opts) };
        if r < 0 {
            return Err(Failure::new(format!("cloning {parent} as {child}"), r));
        }
        Ok(())
    }

    /// Grows an image to `size` bytes (never shrinks).
    pub fn resize(&self, spec_str: &str, size: u64) -> Result<(), Failure> {
        let s = spec(spec_str)?;
        let io = self.pool(&s)?;
        let image = self.open(&io, &s, true)?;
        // SAFETY: an open image; the callback ignores its arguments.
        let r = unsafe {
            (self.api.resize2)(image.image, size, false, no_progress, std::ptr::null_mut())
        };
        if r < 0 {
            return Err(Failure::new(format!("resizing {spec_str} to {size} B"), r));
        }
        Ok(())
    }

    /// Removes an image (one without snapshots; EBUSY if it has clones or watchers).
    pub fn remove(&self, spec_str: &str) -> Result<(), Failure> {
        let s = spec(spec_str)?;
        let io = self.pool(&s)?;
        // SAFETY: a live pool context and a NUL-terminated name.
        let r = unsafe { (self.api.remove)(io.io, s.image.as_ptr()) };
        if r < 0 {
            return Err(Failure::new(format!("removing {spec_str}"), r));
        }
        Ok(())
    }
}

fn show(s: &Spec) -> String {
    let mut out = s.pool.to_string_lossy().into_owned();
    if let Some(ns) = &s.namespace {
        out = format!("{out}/{}", ns.to_string_lossy());
    }
    out = format!("{out}/{}", s.image.to_string_lossy());
    if let Some(snap) = &s.snap {
        out = format!("{out}@{}", snap.to_string_lossy());
    }
    out
}

impl Drop for Conn {
    fn drop(&mut self) {
        // SAFETY: the handle came from rados_create2 and is shut down once, here; every pool
        // context and image borrowed from `self` is gone by now.
        unsafe { (self.api.shutdown)(self.cluster) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_split() {
        let s = spec("images/imgcache-ab@snap").unwrap();
        assert_eq!(s.pool.to_str().unwrap(), "images");
        assert!(s.namespace.is_none());
        assert_eq!(s.image.to_str().unwrap(), "imgcache-ab");
        assert_eq!(s.snap.as_ref().unwrap().to_str().unwrap(), "snap");
        let s = spec("vms/tenant/vm1_disk").unwrap();
        assert_eq!(s.namespace.as_ref().unwrap().to_str().unwrap(), "tenant");
        assert_eq!(show(&s), "vms/tenant/vm1_disk");
        for bad in ["vm1_disk", "/x", "vms/", "a/b/c/d", "a/b\0c"] {
            assert_eq!(
                spec(bad).err().map(|f| f.errno),
                Some(libc::EINVAL),
                "{bad}"
            );
        }
    }

    #[test]
    fn identity_in_ceph_args_means_the_cli() {
        for (args, named) in [
            ("--id cinder", true),
            ("--name=client.x", true),
            ("-n client.x --keyring k", true),
            ("--keyring /k --mon-host 1.2.3.4", false),
            ("--identity-file x", false),
            ("", false),
        ] {
            assert_eq!(names_identity(args), named, "{args}");
        }
    }
}
