//! The config drive's files, as Nova's `metadata_for_config_drive` (nova/api/metadata/base.py)
//! yields them, and the digest of the inputs that re-runs compare.

use anyhow::Result;
use serde::Serialize;
use serde_json::{Map, Value, json};

use super::{Error, Spec};

/// Bumped whenever the tree's layout changes, so a re-run rebuilds drives made differently.
const LAYOUT: u32 = 1;

/// EC2-style metadata versions Nova writes (its `VERSIONS` minus the default
/// `config_drive_skip_versions`), then `latest`.
const EC2_VERSIONS: &[&str] = &["2009-04-04", "latest"];
/// OpenStack metadata versions, as Nova's `OPENSTACK_VERSIONS` (nova/api/metadata/base.py),
/// then `latest`.
const OPENSTACK_VERSIONS: &[&str] = &[
    "2012-08-10",
    "2013-04-04",
    "2013-10-17",
    "2015-10-15",
    "2016-06-30",
    "2016-10-06",
    "2017-02-22",
    "2018-08-27",
    "2020-10-14",
    "2025-04-04",
    "latest",
];
/// First versions with a field or file (Grizzly: random_seed, Havana: vendor_data.json,
/// Liberty: network_data.json, Newton: devices and vendor_data2.json, Victoria:
/// dedicated_cpus).
const GRIZZLY: &str = "2013-04-04";
const HAVANA: &str = "2013-10-17";
const LIBERTY: &str = "2015-10-15";
const NEWTON_ONE: &str = "2016-06-30";
const NEWTON_TWO: &str = "2016-10-06";
const VICTORIA: &str = "2020-10-14";

impl Spec {
    /// A digest of every input (never of the random seeds): equal digests, equal requests.
    pub fn fingerprint(&self) -> String {
        #[derive(Serialize)]
        struct Doc<'a> {
            layout: u32,
            spec: &'a Spec,
        }
        let bytes = to_json(&Doc {
            layout: LAYOUT,
            spec: self,
        });
        format!("sha256:{}", hex::encode(openssl::sha::sha256(&bytes)))
    }

    /// The files of the drive, as Nova's `metadata_for_config_drive` yields them: `ec2/<v>/`
    /// (`meta-data.json`, `user-data`), `openstack/<v>/` (`meta_data.json`, `user_data`,
    /// `vendor_data.json`, `network_data.json`, `vendor_data2.json`, each from the version
    /// that introduced it) and `openstack/content/NNNN`. Each version gets its own random seed,
    /// as each of Nova's lookups does.
    pub fn tree(&self) -> Result<Vec<(String, Vec<u8>)>> {
        let mut out = Vec::new();
        let latest = self.meta_data_json(true)?;
        let ec2 = self.ec2_meta_data(&latest);
        for v in EC2_VERSIONS {
            if let Some(ud) = &self.user_data {
                out.push((format!("ec2/{v}/user-data"), ud.clone()));
            }
            out.push((format!("ec2/{v}/meta-data.json"), to_json(&ec2)));
        }
        for v in OPENSTACK_VERSIONS {
            let at_least = |first: &str| !v.starts_with('2') || *v >= first;
            let md = if *v == "latest" {
                latest.clone()
            } else {
                self.meta_data_for(v)?
            };
            out.push((format!("openstack/{v}/meta_data.json"), to_json(&md)));
            if let Some(ud) = &self.user_data {
                out.push((format!("openstack/{v}/user_data"), ud.clone()));
            }
            if at_least(HAVANA) {
                let vd = to_json(&self.vendor_data);
                out.push((format!("openstack/{v}/vendor_data.json"), vd));
            }
            if at_least(LIBERTY) {
                let nd = to_json(&self.network_data);
                out.push((format!("openstack/{v}/network_data.json"), nd));
            }
            if at_least(NEWTON_TWO) {
                out.push((format!("openstack/{v}/vendor_data2.json"), b"{}".to_vec()));
            }
        }
        for (i, (_, content)) in self.files.iter().enumerate() {
            out.push((format!("openstack/content/{i:04}"), content.clone()));
        }
        Ok(out)
    }

    fn meta_data_for(&self, version: &str) -> Result<Map<String, Value>> {
        self.meta_data_json(version >= GRIZZLY)
            .map(|m| self.versioned(m, version))
    }

    /// `meta_data.json` of the latest version.
    fn meta_data_json(&self, seed: bool) -> Result<Map<String, Value>> {
        let mut m = Map::new();
        m.insert("uuid".into(), json!(self.instance));
        if !self.meta.is_empty() {
            m.insert("meta".into(), json!(self.meta));
        }
        if !self.files.is_empty() {
            let files: Vec<Value> = (self.files.iter().enumerate())
                .map(|(i, (path, _))| json!({"path": path, "content_path": format!("/content/{i:04}")}))
                .collect();
            m.insert("files".into(), Value::Array(files));
        }
        if !self.ssh_keys.is_empty() {
            m.insert("public_keys".into(), json!(self.ssh_keys));
            let keys: Vec<Value> = (self.ssh_keys.iter())
                .map(|(name, data)| json!({"name": name, "type": "ssh", "data": data}))
                .collect();
            m.insert("keys".into(), Value::Array(keys));
        }
        m.insert("hostname".into(), json!(self.hostname));
        m.insert("name".into(), json!(self.instance));
        m.insert("launch_index".into(), json!(0));
        // Nova's default_availability_zone.
        m.insert("availability_zone".into(), json!("nova"));
        if seed {
            m.insert("random_seed".into(), json!(random_seed()?));
        }
        m.insert("devices".into(), json!([]));
        m.insert("dedicated_cpus".into(), json!([]));
        for (k, v) in &self.meta_data {
            m.insert(k.clone(), v.clone());
        }
        Ok(m)
    }

    /// Drops the fields a version predates (unless `--meta-data` set them).
    fn versioned(&self, mut m: Map<String, Value>, version: &str) -> Map<String, Value> {
        for (key, first) in [("devices", NEWTON_ONE), ("dedicated_cpus", VICTORIA)] {
            if version < first && !self.meta_data.contains_key(key) {
                m.remove(key);
            }
        }
        m
    }

    /// `ec2/<v>/meta-data.json`, from the final OpenStack fields.
    fn ec2_meta_data(&self, latest: &Map<String, Value>) -> Value {
        let get = |k: &str, default: &str| {
            latest
                .get(k)
                .and_then(Value::as_str)
                .unwrap_or(default)
                .to_owned()
        };
        let hostname = get("hostname", &self.hostname);
        let mut m = json!({
            "ami-launch-index": 0,
            "hostname": hostname,
            "local-hostname": hostname,
            "public-hostname": hostname,
            "instance-id": get("uuid", &self.instance),
            "instance-action": "none",
            "placement": {"availability-zone": get("availability_zone", "nova")},
            "security-groups": [],
        });
        // EC2 shows one key: Nova's first (the instance's key_name).
        if let Some(data) = self.ssh_keys.values().next() {
            m["public-keys"] = json!({"0": {"openssh-key": data}});
        }
        m
    }
}

/// JSON bytes. Serializing maps with string keys, strings and numbers cannot fail.
fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

/// 512 random bytes, base64: a fresh seed per drive, as Nova (`os.urandom(512)`).
fn random_seed() -> Result<String, Error> {
    let mut buf = [0u8; 512];
    openssl::rand::rand_bytes(&mut buf).map_err(|e| Error::Random(e.to_string()))?;
    Ok(openssl::base64::encode_block(&buf))
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::super::Format;
    use super::*;

    fn spec() -> Spec {
        Spec {
            format: Format::Iso9660,
            instance: "vm1".into(),
            hostname: "vm1".into(),
            user_data: Some(b"#cloud-config\n".to_vec()),
            meta_data: Map::new(),
            network_data: json!({}),
            vendor_data: json!({}),
            ssh_keys: BTreeMap::new(),
            meta: BTreeMap::new(),
            files: vec![("/etc/motd".into(), b"hi".to_vec())],
        }
    }

    #[test]
    fn tree_follows_nova_versions() {
        let t = spec().tree().unwrap();
        let names: BTreeSet<&str> = t.iter().map(|(p, _)| p.as_str()).collect();
        assert!(names.contains("openstack/latest/meta_data.json"));
        assert!(names.contains("openstack/2012-08-10/user_data"));
        assert!(!names.contains("openstack/2012-08-10/vendor_data.json"));
        assert!(names.contains("openstack/2013-10-17/vendor_data.json"));
        assert!(!names.contains("openstack/2013-10-17/network_data.json"));
        assert!(names.contains("openstack/2016-10-06/vendor_data2.json"));
        assert!(names.contains("openstack/content/0000"));
        assert!(names.contains("ec2/latest/meta-data.json"));
        let md = |p: &str| -> Value {
            serde_json::from_slice(&t.iter().find(|(n, _)| n == p).unwrap().1).unwrap()
        };
        assert!(md("openstack/2012-08-10/meta_data.json")["random_seed"].is_null());
        assert!(md("openstack/2012-08-10/meta_data.json")["devices"].is_null());
        assert_eq!(
            md("openstack/latest/meta_data.json")["files"][0]["content_path"],
            "/content/0000"
        );
    }

    #[test]
    fn fingerprint_ignores_seeds_and_sees_inputs() {
        let a = spec();
        assert_eq!(a.fingerprint(), spec().fingerprint());
        let mut b = spec();
        b.files[0].1 = b"ho".to_vec();
        assert_ne!(a.fingerprint(), b.fingerprint());
    }
}
