//! A real Glance (PyPI glance under gunicorn, sqlite, file store), started once per test binary
//! by `scripts/glance/start` and stopped at exit by `scripts/glance/stop`. Tests that use it fail
//! (never skip) when it cannot start: run `scripts/glance/install` first (the test script does).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// The shared real Glance.
pub struct RealGlance {
    pub url: String,
    dir: PathBuf,
}

static GLANCE: OnceLock<RealGlance> = OnceLock::new();
static UPLOADS: Mutex<()> = Mutex::new(());

fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/glance")
}

extern "C" fn stop_at_exit() {
    if let Some(g) = GLANCE.get() {
        let _ = Command::new(scripts().join("stop")).arg(&g.dir).output();
        let _ = std::fs::remove_dir_all(&g.dir);
    }
}

/// Starts Glance on first use; every later call returns the same one.
pub fn real() -> &'static RealGlance {
    GLANCE.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("imgcache-glance-")
            .tempdir()
            .expect("tempdir")
            .keep();
        let out = Command::new(scripts().join("start"))
            .arg(&dir)
            .output()
            .expect("run scripts/glance/start");
        assert!(
            out.status.success(),
            "cannot start the real Glance (run scripts/glance/install): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let url = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        // SAFETY: registering a plain extern "C" function with no captured state.
        unsafe {
            libc::atexit(stop_at_exit);
        }
        RealGlance { url, dir }
    })
}

impl RealGlance {
    fn http() -> reqwest::blocking::Client {
        reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(300))
            .build()
            .expect("client")
    }

    /// Creates an image record (status `queued`) and returns its id.
    pub fn create(&self, name: &str, disk_format: &str) -> String {
        self.create_with(name, disk_format, &[])
    }

    /// Creates an image record with extra properties (kernel_id, ...).
    pub fn create_with(&self, name: &str, disk_format: &str, props: &[(&str, &str)]) -> String {
        let mut body = serde_json::json!({
            "name": name,
            "disk_format": disk_format,
            "container_format": if disk_format == "aki" || disk_format == "ari" { disk_format } else { "bare" },
        });
        for (k, v) in props {
            body[*k] = serde_json::json!(v);
        }
        let resp = Self::http()
            .post(format!("{}/v2/images", self.url))
            .header("Content-Type", "application/json")
            .body(body.to_string())
            .send()
            .expect("create image");
        assert_eq!(resp.status().as_u16(), 201, "create: {:?}", resp.text());
        let v: serde_json::Value =
            serde_json::from_slice(&resp.bytes().expect("body")).expect("json");
        v["id"].as_str().expect("id").to_owned()
    }

    /// Creates an image and uploads `file` into it; returns the id once it is active.
    pub fn upload(&self, name: &str, disk_format: &str, file: &Path) -> String {
        self.upload_with(name, disk_format, file, &[])
    }

    /// Like [`upload`](Self::upload), with extra image properties.
    pub fn upload_with(
        &self,
        name: &str,
        disk_format: &str,
        file: &Path,
        props: &[(&str, &str)],
    ) -> String {
        self.try_upload(name, disk_format, file, props)
            .unwrap_or_else(|e| panic!("upload {name}: {e}"))
    }

    /// Uploads, returning Glance's refusal (e.g. 415 for a qcow2 with a backing file) as `Err`.
    /// A refused image is deleted again.
    pub fn try_upload(
        &self,
        name: &str,
        disk_format: &str,
        file: &Path,
        props: &[(&str, &str)],
    ) -> Result<String, String> {
        // Glance on sqlite fails concurrent uploads now and then (500, "database is locked"):
        // tests upload one at a time.
        let _one_at_a_time = UPLOADS.lock().unwrap_or_else(|e| e.into_inner());
        let id = self.create_with(name, disk_format, props);
        let resp = Self::http()
            .put(format!("{}/v2/images/{id}/file", self.url))
            .header("Content-Type", "application/octet-stream")
            .body(std::fs::File::open(file).expect("open upload"))
            .send()
            .expect("upload");
        let status = resp.status().as_u16();
        if status != 204 {
            let body = resp.text().unwrap_or_default();
            let _ = Self::http()
                .delete(format!("{}/v2/images/{id}", self.url))
                .send();
            return Err(format!("{status}: {body}"));
        }
        let record = self.show(&id);
        assert_eq!(record["status"], "active", "{record}");
        Ok(id)
    }

    /// `GET /v2/images/{id}` as JSON.
    pub fn show(&self, id: &str) -> serde_json::Value {
        let body = Self::http()
            .get(format!("{}/v2/images/{id}", self.url))
            .send()
            .expect("show")
            .bytes()
            .expect("body");
        serde_json::from_slice(&body).expect("json")
    }
}
