//! A real Glance (PyPI glance under gunicorn, sqlite, file store), started once per test binary
//! by `scripts/glance/start` and stopped at exit by `scripts/glance/stop`. Tests that use it fail
//! (never skip) when it cannot start: run `scripts/glance/install` first (the test script does).

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use super::service::{Service, Started};

/// The shared real Glance.
pub struct RealGlance {
    pub url: String,
}

static GLANCE: Service<RealGlance> = Service::new(
    "glance",
    "start",
    "stop",
    "imgcache-glance-",
    "scripts/glance/install",
    RealGlance::ready,
);
static UPLOADS: Mutex<()> = Mutex::new(());

/// Starts Glance on first use; every later call returns the same one.
#[track_caller]
pub fn real() -> &'static RealGlance {
    GLANCE.shared()
}

impl RealGlance {
    /// From scripts/glance/start's one line: the base URL.
    fn ready(s: &Started) -> Result<RealGlance, String> {
        let url = s.stdout.trim();
        if !url.starts_with("http://127.0.0.1:") || url.lines().count() != 1 {
            return Err(format!("not one base URL: {url:?}"));
        }
        Ok(RealGlance {
            url: url.to_owned(),
        })
    }

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
        let mut attempt = 0;
        let (id, resp) = loop {
            attempt += 1;
            let id = self.create_with(name, disk_format, props);
            let resp = Self::http()
                .put(format!("{}/v2/images/{id}/file", self.url))
                .header("Content-Type", "application/octet-stream")
                .body(std::fs::File::open(file).expect("open upload"))
                .send()
                .expect("upload");
            // Setup, not what is under test: a 5xx (sqlite busy under load) is tried again.
            if resp.status().is_server_error() && attempt < 3 {
                let _ = Self::http()
                    .delete(format!("{}/v2/images/{id}", self.url))
                    .send();
                std::thread::sleep(std::time::Duration::from_millis(500 * attempt));
                continue;
            }
            break (id, resp);
        };
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

    /// Adds (or replaces) string properties of an image with a JSON patch. Glance checks an
    /// `img_signature*` set only while data is uploaded, so properties set afterwards reach
    /// the client as they are (a tampered signature too).
    pub fn set_properties(&self, id: &str, props: &[(&str, &str)]) {
        let ops: Vec<serde_json::Value> = props
            .iter()
            .map(|(k, v)| serde_json::json!({"op": "add", "path": format!("/{k}"), "value": v}))
            .collect();
        let resp = Self::http()
            .patch(format!("{}/v2/images/{id}", self.url))
            .header(
                "Content-Type",
                "application/openstack-images-v2.1-json-patch",
            )
            .body(serde_json::Value::Array(ops).to_string())
            .send()
            .expect("patch image");
        assert_eq!(resp.status().as_u16(), 200, "patch: {:?}", resp.text());
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
