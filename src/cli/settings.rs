//! From what the user typed to what the commands run with: sizes parsed, the cache layout
//! built, fetch options and Glance access assembled, clap's value enums mapped onto the domain's
//! types. Every problem here is a usage error naming the flag.

use anyhow::Result;

use super::{
    BackendArg, ConfigDriveArgs, ConfigDriveFormatArg, CreateArgs, DeleteArgs, FetchArgs,
    FetchOpts, FsArg, GlanceArgs, Global, InspectArgs, ListArgs, PruneArgs, RbdArgs, VerifyArgs,
};
use crate::cache::Cache;
use crate::commands::{create, delete, fetch, inspect, list, prune, verify};
use crate::configdrive;
use crate::error::UsageError;
use crate::fetch::download::MinRate;
use crate::fetch::{Options, SignaturePolicy, Trusted};
use crate::http::HttpSettings;
use crate::inspect::{Format, Limits};
use crate::openstack;
use crate::rbd;
use crate::templates::Fs;
use crate::units::{parse_reserve, parse_size};

fn cache(global: &Global) -> Result<Cache> {
    Cache::new(&global.instances_path, &global.base_dir_name)
}

/// `imgcache fetch`.
/// The cache of a command that only reads one (`list`, `prune`, `verify`): its instances path
/// must exist unless `allow_missing` (a typo in a cron line is an error, not an empty cache).
fn existing_cache(global: &Global, allow_missing: bool) -> Result<Cache> {
    let cache = cache(global)?;
    if !allow_missing && !cache.instances_dir().is_dir() {
        return Err(
            crate::error::NoInstancesPath(cache.instances_dir().display().to_string()).into(),
        );
    }
    Ok(cache)
}

pub fn fetch(global: &Global, args: FetchArgs) -> Result<fetch::Request> {
    Ok(fetch::Request {
        cache: cache(global)?,
        opts: fetch_options(&args.glance, &args.fetch)?,
        access: access(&args.glance),
        ids: args.ids,
        jobs: args.jobs.into(),
        json: args.json,
    })
}

/// `imgcache create`.
pub fn create(global: &Global, args: CreateArgs) -> Result<create::Request> {
    let root_size = parse_size("--size", &args.size)?;
    let ephemeral_gib = args
        .ephemeral
        .as_deref()
        .map(|s| whole_units("--ephemeral", s, 30, "GiB"))
        .transpose()?;
    let swap_mib = args
        .swap
        .as_deref()
        .map(|s| whole_units("--swap", s, 20, "MiB"))
        .transpose()?;
    let config_drive = config_drive(&args.instance, &args.config_drive)?;
    Ok(create::Request {
        cache: cache(global)?,
        opts: fetch_options(&args.glance, &args.fetch)?,
        access: access(&args.glance),
        cluster: cluster(&args.rbd),
        instance: args.instance,
        image: args.image,
        root_size,
        backend: match args.backend {
            BackendArg::Raw => create::Backend::Raw,
            BackendArg::Qcow2 => create::Backend::Qcow2,
            BackendArg::Rbd => create::Backend::Rbd,
        },
        ephemeral_gib,
        ephemeral_fs: match args.ephemeral_fs {
            FsArg::Ext2 => Fs::Ext2,
            FsArg::Ext3 => Fs::Ext3,
            FsArg::Ext4 => Fs::Ext4,
            FsArg::Xfs => Fs::Xfs,
            FsArg::Vfat => Fs::Vfat,
        },
        swap_mib,
        preallocate: args.preallocate,
        force: args.force,
        keep_local_base: args.keep_local_base,
        config_drive,
        json: args.json,
    })
}

/// The config drive's contents, read and checked now: a bad input fails before anything is
/// fetched or made.
fn config_drive(instance: &str, args: &ConfigDriveArgs) -> Result<Option<configdrive::Spec>> {
    if !args.config_drive {
        return Ok(None);
    }
    let flags = configdrive::Flags {
        format: match args.config_drive_format {
            ConfigDriveFormatArg::Iso9660 => configdrive::Format::Iso9660,
            ConfigDriveFormatArg::Vfat => configdrive::Format::Vfat,
        },
        user_data: args.user_data.clone(),
        meta_data: args.meta_data.clone(),
        network_data: args.network_data.clone(),
        vendor_data: args.vendor_data.clone(),
        hostname: args.hostname.clone(),
        ssh_keys: args.ssh_key.clone(),
        meta: args.meta.clone(),
        files: args.file.clone(),
    };
    configdrive::Spec::load(instance, &flags).map(Some)
}

/// `imgcache delete`.
pub fn delete(global: &Global, args: DeleteArgs) -> Result<delete::Request> {
    Ok(delete::Request {
        cache: cache(global)?,
        cluster: cluster(&args.rbd),
        instance: args.instance,
        force: args.force,
        lock_timeout: args.lock_timeout,
    })
}

/// `imgcache prune`. The images-pool pass runs only when a Ceph configuration is given.
pub fn prune(global: &Global, args: PruneArgs) -> Result<prune::Request> {
    let max_size = args
        .max_size
        .as_deref()
        .map(|s| crate::units::parse_reserve("--max-size", s))
        .transpose()?;
    Ok(prune::Request {
        cache: existing_cache(global, args.allow_missing)?,
        ages: prune::Ages {
            original: args.min_age,
            resized: args.min_age_resized,
        },
        temp_age: args.temp_age,
        max_size,
        rbd: (args.rbd.ceph_conf.is_some() || env_set("CEPH_CONF")).then(|| cluster(&args.rbd)),
        keep: args.keep,
        keep_from: args.keep_from,
        dry_run: args.dry_run,
        json: args.json,
        quiet: global.quiet,
    })
}

/// `imgcache list`.
pub fn list(global: &Global, args: ListArgs) -> Result<list::Request> {
    Ok(list::Request {
        cache: existing_cache(global, args.allow_missing)?,
        json: args.json,
    })
}

/// `imgcache verify`.
pub fn verify(global: &Global, args: VerifyArgs) -> Result<verify::Request> {
    Ok(verify::Request {
        cache: existing_cache(global, args.allow_missing)?,
        ids: args.ids,
        remove_corrupt: args.remove_corrupt,
        lock_timeout: args.lock_timeout,
        json: args.json,
    })
}

/// `imgcache inspect`.
pub fn inspect(args: InspectArgs) -> Result<inspect::Request> {
    let declared = match &args.declared {
        None => None,
        Some(d) => Some(Format::parse(d).ok_or_else(|| {
            UsageError(format!(
                "invalid --declared {d:?}; use one of raw, qcow2, vmdk, vhd, vhdx, vdi, iso"
            ))
        })?),
    };
    Ok(inspect::Request {
        limits: Limits {
            max_virtual_size: parse_size("--max-virtual-size", &args.max_virtual_size)?,
            allow_luks: args.allow_luks,
        },
        declared,
        qemu_img: !args.no_qemu_img,
        json: args.json,
        file: args.file,
    })
}

/// Fetch settings from the flags.
fn fetch_options(glance: &GlanceArgs, f: &FetchOpts) -> Result<Options, UsageError> {
    Ok(Options {
        lock_timeout: f.lock_timeout,
        retries: glance.retries,
        connections: f.connections,
        retry_backoff: glance.retry_backoff,
        force_raw: !f.no_force_raw,
        revalidate: f.revalidate || f.replace,
        replace: f.replace,
        allow_direct_file: f.allow_direct_file,
        limits: Limits {
            max_virtual_size: parse_size("--max-virtual-size", &f.max_virtual_size)?,
            allow_luks: false,
        },
        max_image_size: parse_size("--max-image-size", &f.max_image_size)?,
        min_free: parse_reserve("--min-free", &f.min_free)?,
        min_rate: MinRate {
            bytes: parse_size("--min-rate", &glance.min_rate)?
                .saturating_mul(glance.read_timeout.as_secs().max(1)),
            window: glance.read_timeout,
        },
        signatures: signature_policy(f)?,
    })
}

/// `--verify-signatures`, `--trusted-cert`, `--certificate-dir`.
fn signature_policy(f: &FetchOpts) -> Result<Option<SignaturePolicy>, UsageError> {
    if !f.verify_signatures {
        if !f.trusted_cert.is_empty() {
            return Err(UsageError(
                "--trusted-cert needs --verify-signatures (or verify_signatures = true)".into(),
            ));
        }
        return Ok(None);
    }
    if let Some(t) = f.trusted_cert.iter().find(|t| t.is_empty()) {
        return Err(UsageError(format!(
            "invalid --trusted-cert {t:?}: give a certificate UUID or a PEM file"
        )));
    }
    Ok(Some(SignaturePolicy {
        trusted: f.trusted_cert.iter().map(|t| Trusted::parse(t)).collect(),
        certificate_dir: f.certificate_dir.clone(),
        key_manager: None,
    }))
}

/// The credential sources and HTTP settings; empty values count as unset.
fn access(args: &GlanceArgs) -> openstack::Access {
    let set = |v: &Option<String>| v.clone().filter(|s| !s.is_empty());
    openstack::Access {
        flags: openstack::Flags {
            cloud: set(&args.os_cloud),
            glance_url: set(&args.glance_url),
            token: set(&args.token),
            cacert: args.cacert.clone(),
            insecure: args.insecure,
            region: set(&args.os_region_name),
            interface: set(&args.os_interface),
        },
        http: HttpSettings {
            cacert: None,
            insecure: false,
            connect_timeout: args.connect_timeout,
            read_timeout: args.read_timeout,
        },
    }
}

/// The Ceph cluster and pools.
fn cluster(args: &RbdArgs) -> rbd::Cluster {
    rbd::Cluster {
        rbd: rbd::Rbd {
            // Without --ceph-conf the Ceph tools find their configuration the Ceph way
            // (CEPH_CONF, then /etc/ceph/ceph.conf) and read CEPH_ARGS (--id, --keyring).
            conf: args.ceph_conf.clone(),
            id: args.ceph_id.clone(),
            keyring: args.ceph_keyring.clone(),
            timeout: args.rbd_timeout,
            native: rbd::Native::default(),
        },
        images_pool: args.images_pool.clone(),
        instances_pool: args.instances_pool.clone(),
    }
}

fn env_set(var: &str) -> bool {
    std::env::var_os(var).is_some_and(|v| !v.is_empty())
}

/// A size that must be a whole number of `unit`s (Nova's ephemeral_gb, swap MiB).
fn whole_units(what: &str, s: &str, shift: u32, unit: &str) -> Result<u64, UsageError> {
    let bytes = parse_size(what, s)?;
    if bytes == 0 || bytes % (1 << shift) != 0 {
        return Err(UsageError(format!(
            "invalid {what} {s:?}: must be a positive whole number of {unit}"
        )));
    }
    Ok(bytes >> shift)
}
