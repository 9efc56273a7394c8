//! `--verify-signatures` against cursive, the library Nova verifies with: keys and
//! certificates made with the `openssl` CLI, images signed as Glance's documentation says
//! (`openssl dgst -sha256 -sign key.pem -sigopt rsa_padding_mode:pss`, then base64), held by a
//! real Glance, and for every case cursive's own verdict (scripts/cursive/verify, from the
//! Glance venv) must be imgcache's: accepted and cached, or refused with exit 17 and nothing
//! left in `_base`. Certificates come from `--certificate-dir`.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::support::service::Service;
use super::support::{self, Cache, glance, run};

/// The certificates and keys of the matrix, in one temp dir: `certs/<uuid>.pem` is what both
/// imgcache (`--certificate-dir`) and cursive's stubbed key manager read.
struct Pki {
    dir: tempfile::TempDir,
}

/// A certificate id as Barbican would hand it out.
fn uuid(n: u32) -> String {
    format!("{n:08x}-0000-4000-8000-{n:012x}")
}

const CA: u32 = 1;
const OTHER_CA: u32 = 2;
const RSA: u32 = 10;
const RSA2: u32 = 11;
const EC384: u32 = 12;
const EC521: u32 = 13;
const DSA: u32 = 14;
const ROGUE: u32 = 15;
const EXPIRED: u32 = 16;
const FUTURE: u32 = 17;
/// A CA under CA, and a signer under it.
const INTER: u32 = 20;
const UNDER_INTER: u32 = 21;
/// A root that allows no intermediate (pathlen 0), one under it anyway, and a signer.
const ROOT0: u32 = 22;
const INTER0: u32 = 23;
const UNDER_INTER0: u32 = 24;

impl Pki {
    #[track_caller]
    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .expect("run openssl");
        support::assert_exit_ok(&out);
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn certs(&self) -> PathBuf {
        self.path("certs")
    }

    fn cert(&self, n: u32) -> String {
        format!("certs/{}.pem", uuid(n))
    }

    /// A CA certificate (basic constraints CA, key usage keyCertSign), self-signed.
    fn ca(&self, n: u32) {
        self.root(n, "basicConstraints=critical,CA:TRUE");
    }

    /// A self-signed CA certificate with these basic constraints.
    fn root(&self, n: u32, constraints: &str) {
        let key = format!("{n}.key");
        self.openssl(&["genrsa", "-out", &key, "2048"]);
        self.openssl(&[
            "req",
            "-x509",
            "-new",
            "-key",
            &key,
            "-subj",
            &format!("/CN=ca {n}"),
            "-days",
            "30",
            "-addext",
            constraints,
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-out",
            &self.cert(n),
        ]);
    }

    /// A leaf certificate for key `n` issued by CA `ca`.
    fn leaf(&self, n: u32, ca: u32) {
        self.issue(n, ca, &[]);
    }

    /// An intermediate CA for key `n` (a new RSA key) issued by CA `ca`.
    fn intermediate(&self, n: u32, ca: u32) {
        self.openssl(&["genrsa", "-out", &format!("{n}.key"), "2048"]);
        std::fs::write(
            self.path("ca-ext.cnf"),
            "[v3_ca]\nbasicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign\n",
        )
        .expect("ca-ext.cnf");
        self.issue(n, ca, &["-extfile", "ca-ext.cnf", "-extensions", "v3_ca"]);
    }

    /// A certificate for key `n` issued by CA `ca`, with extra `openssl x509` arguments.
    fn issue(&self, n: u32, ca: u32, extra: &[&str]) {
        let csr = format!("{n}.csr");
        self.openssl(&[
            "req",
            "-new",
            "-key",
            &format!("{n}.key"),
            "-subj",
            &format!("/CN=signer {n}"),
            "-out",
            &csr,
        ]);
        let (serial, ca_cert, ca_key, out) = (
            n.to_string(),
            self.cert(ca),
            format!("{ca}.key"),
            self.cert(n),
        );
        let mut args = vec![
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_cert,
            "-CAkey",
            &ca_key,
            "-days",
            "30",
            "-set_serial",
            &serial,
            "-out",
            &out,
        ];
        args.extend(extra);
        self.openssl(&args);
    }

    /// A self-signed certificate for key `n` valid only between two dates (`openssl ca`).
    fn dated(&self, n: u32, start: &str, end: &str) {
        let csr = format!("{n}.csr");
        self.openssl(&[
            "req",
            "-new",
            "-key",
            &format!("{n}.key"),
            "-subj",
            &format!("/CN=dated {n}"),
            "-out",
            &csr,
        ]);
        self.openssl(&[
            "ca",
            "-batch",
            "-config",
            "ca.cnf",
            "-selfsign",
            "-keyfile",
            &format!("{n}.key"),
            "-in",
            &csr,
            "-startdate",
            start,
            "-enddate",
            end,
            "-notext",
            "-out",
            &self.cert(n),
        ]);
    }

    fn new() -> Pki {
        let pki = Pki {
            dir: tempfile::tempdir().expect("tempdir"),
        };
        std::fs::create_dir(pki.certs()).expect("certs dir");
        std::fs::write(
            pki.path("ca.cnf"),
            "[ca]\ndefault_ca = d\n[d]\ndatabase = index.txt\nnew_certs_dir = .\nserial = serial\n\
             default_md = sha256\npolicy = p\nunique_subject = no\n[p]\ncommonName = supplied\n",
        )
        .expect("ca.cnf");
        std::fs::write(pki.path("index.txt"), "").expect("index");
        std::fs::write(pki.path("serial"), "01\n").expect("serial");
        pki.ca(CA);
        pki.ca(OTHER_CA);
        for n in [RSA, RSA2, ROGUE, EXPIRED, FUTURE] {
            pki.openssl(&["genrsa", "-out", &format!("{n}.key"), "2048"]);
        }
        for (n, curve) in [(EC384, "secp384r1"), (EC521, "secp521r1")] {
            pki.openssl(&[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                &format!("ec_paramgen_curve:{curve}"),
                "-out",
                &format!("{n}.key"),
            ]);
        }
        pki.openssl(&[
            "genpkey",
            "-genparam",
            "-algorithm",
            "DSA",
            "-pkeyopt",
            "dsa_paramgen_bits:2048",
            "-out",
            "dsa-params.pem",
        ]);
        pki.openssl(&[
            "genpkey",
            "-paramfile",
            "dsa-params.pem",
            "-out",
            &format!("{DSA}.key"),
        ]);
        for n in [RSA, RSA2, EC384, EC521, DSA] {
            pki.leaf(n, CA);
        }
        pki.leaf(ROGUE, OTHER_CA);
        pki.intermediate(INTER, CA);
        pki.root(ROOT0, "basicConstraints=critical,CA:TRUE,pathlen:0");
        pki.intermediate(INTER0, ROOT0);
        for (n, ca) in [(UNDER_INTER, INTER), (UNDER_INTER0, INTER0)] {
            pki.openssl(&["genrsa", "-out", &format!("{n}.key"), "2048"]);
            pki.leaf(n, ca);
        }
        pki.dated(EXPIRED, "20200101000000Z", "20200201000000Z");
        pki.dated(FUTURE, "20991231000000Z", "21001231000000Z");
        pki
    }

    /// The base64 signature of `data` by key `n` (`rsa` adds the PSS options Glance's
    /// documentation gives; `extra` more `-sigopt`s).
    fn sign(&self, n: u32, hash: &str, data: &Path, rsa: bool, extra: &[&str]) -> String {
        let sig = self.path(&format!("sig-{n}"));
        let mut args = vec![
            "dgst".to_owned(),
            format!("-{hash}"),
            "-sign".into(),
            format!("{n}.key"),
        ];
        if rsa {
            args.extend(["-sigopt".into(), "rsa_padding_mode:pss".into()]);
        }
        for e in extra {
            args.extend(["-sigopt".into(), (*e).to_owned()]);
        }
        args.extend(["-out".into(), sig.display().to_string()]);
        args.push(data.display().to_string());
        self.openssl(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let out = Command::new("openssl")
            .args(["base64", "-A", "-in"])
            .arg(&sig)
            .output()
            .expect("openssl base64");
        support::assert_exit_ok(&out);
        String::from_utf8(out.stdout)
            .expect("base64")
            .trim()
            .to_owned()
    }
}

/// One case of the matrix.
struct Case {
    name: &'static str,
    /// What Glance holds (may differ from what was signed).
    data: Vec<u8>,
    props: Vec<(&'static str, String)>,
    /// `--trusted-cert` values (UUIDs or files).
    trusted: Vec<String>,
    accept: bool,
}

/// The four properties.
fn props(cert: u32, hash: &str, key_type: &str, sig: &str) -> Vec<(&'static str, String)> {
    vec![
        ("img_signature_certificate_uuid", uuid(cert)),
        ("img_signature_hash_method", hash.to_owned()),
        ("img_signature_key_type", key_type.to_owned()),
        ("img_signature", sig.to_owned()),
    ]
}

fn venv_python() -> PathBuf {
    let venv = std::env::var_os("IMGCACHE_GLANCE_VENV").map_or_else(
        || {
            PathBuf::from(std::env::var_os("HOME").expect("HOME"))
                .join(".cache/imgcache/glance-venv")
        },
        PathBuf::from,
    );
    venv.join("bin/python")
}

/// cursive's verdict on the same inputs: true = accept.
fn cursive_accepts(pki: &Pki, data: &Path, case: &Case) -> (bool, String) {
    let props: serde_json::Map<String, serde_json::Value> = case
        .props
        .iter()
        .map(|(k, v)| ((*k).to_owned(), serde_json::json!(v)))
        .collect();
    let trusted: Vec<String> = case
        .trusted
        .iter()
        .map(|t| match t.strip_prefix("file:") {
            // A trusted PEM file is the same certificate as its UUID in the directory.
            Some(uuid) => uuid.to_owned(),
            None => t.clone(),
        })
        .collect();
    let out = Command::new(venv_python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/cursive/verify"))
        .arg(pki.certs())
        .arg(data)
        .arg(serde_json::Value::Object(props).to_string())
        .args(&trusted)
        .output()
        .expect("run scripts/cursive/verify");
    support::assert_exit_ok(&out);
    let verdict = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        verdict == "accept" || verdict.starts_with("refuse: "),
        "cursive driver: {verdict:?} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (verdict == "accept", verdict)
}

fn matrix(pki: &Pki, signed: &Path, data: &[u8]) -> Vec<Case> {
    let rsa = |hash: &str, method: &str, extra: &[&str]| {
        props(
            RSA,
            method,
            "RSA-PSS",
            &pki.sign(RSA, hash, signed, true, extra),
        )
    };
    let sig256 = pki.sign(RSA, "sha256", signed, true, &[]);
    let signed_by = |n: u32| {
        props(
            n,
            "SHA-256",
            "RSA-PSS",
            &pki.sign(n, "sha256", signed, true, &[]),
        )
    };
    let mut tampered_sig = sig256.clone().into_bytes();
    // Flip one base64 digit in the middle: still base64, no longer the signature.
    let mid = tampered_sig.len() / 2;
    tampered_sig[mid] = if tampered_sig[mid] == b'A' {
        b'B'
    } else {
        b'A'
    };
    let tampered_sig = String::from_utf8(tampered_sig).expect("ascii");
    let mut tampered_data = data.to_vec();
    tampered_data[data.len() / 3] ^= 1;
    let ok = |name, props| Case {
        name,
        data: data.to_vec(),
        props,
        trusted: vec![],
        accept: true,
    };
    let no = |name, props| Case {
        accept: false,
        ..ok(name, props)
    };
    let mut missing = rsa("sha256", "SHA-256", &[]);
    missing.retain(|(k, _)| *k != "img_signature_key_type");
    vec![
        ok("rsa-pss sha224", rsa("sha224", "SHA-224", &[])),
        ok("rsa-pss sha256", rsa("sha256", "SHA-256", &[])),
        ok("rsa-pss sha384", rsa("sha384", "SHA-384", &[])),
        ok("rsa-pss sha512", rsa("sha512", "SHA-512", &[])),
        ok(
            "rsa-pss salt 32",
            rsa("sha256", "SHA-256", &["rsa_pss_saltlen:32"]),
        ),
        ok(
            "ecc p-384",
            props(
                EC384,
                "SHA-384",
                "ECC_SECP384R1",
                &pki.sign(EC384, "sha384", signed, false, &[]),
            ),
        ),
        ok(
            "ecc p-521",
            props(
                EC521,
                "SHA-512",
                "ECC_SECP521R1",
                &pki.sign(EC521, "sha512", signed, false, &[]),
            ),
        ),
        ok(
            "dsa",
            props(
                DSA,
                "SHA-256",
                "DSA",
                &pki.sign(DSA, "sha256", signed, false, &[]),
            ),
        ),
        Case {
            data: tampered_data,
            ..no("tampered data", rsa("sha256", "SHA-256", &[]))
        },
        no(
            "tampered signature",
            props(RSA, "SHA-256", "RSA-PSS", &tampered_sig),
        ),
        no(
            "wrong certificate",
            props(RSA2, "SHA-256", "RSA-PSS", &sig256),
        ),
        no(
            "expired certificate",
            props(
                EXPIRED,
                "SHA-256",
                "RSA-PSS",
                &pki.sign(EXPIRED, "sha256", signed, true, &[]),
            ),
        ),
        no(
            "not yet valid certificate",
            props(
                FUTURE,
                "SHA-256",
                "RSA-PSS",
                &pki.sign(FUTURE, "sha256", signed, true, &[]),
            ),
        ),
        Case {
            trusted: vec![uuid(CA)],
            ..ok("chain to the trusted ca", rsa("sha256", "SHA-256", &[]))
        },
        Case {
            trusted: vec![format!("file:{}", uuid(CA))],
            ..ok("chain to a trusted pem file", rsa("sha256", "SHA-256", &[]))
        },
        Case {
            trusted: vec![uuid(CA)],
            ..no(
                "untrusted chain",
                props(
                    ROGUE,
                    "SHA-256",
                    "RSA-PSS",
                    &pki.sign(ROGUE, "sha256", signed, true, &[]),
                ),
            )
        },
        Case {
            trusted: vec![uuid(CA), uuid(INTER)],
            ..ok(
                "chain through a trusted intermediate",
                signed_by(UNDER_INTER),
            )
        },
        Case {
            // cursive builds chains from trusted certificates only.
            trusted: vec![uuid(CA)],
            ..no(
                "an intermediate that is not trusted",
                signed_by(UNDER_INTER),
            )
        },
        Case {
            trusted: vec![uuid(ROOT0), uuid(INTER0)],
            ..no("a path length exceeded", signed_by(UNDER_INTER0))
        },
        ok(
            // cursive checks the key's class, not its curve, against the name.
            "a p-521 key named ECC_SECP384R1",
            props(
                EC521,
                "SHA-512",
                "ECC_SECP384R1",
                &pki.sign(EC521, "sha512", signed, false, &[]),
            ),
        ),
        ok(
            "ecc p-384 over sha-256",
            props(
                EC384,
                "SHA-256",
                "ECC_SECP384R1",
                &pki.sign(EC384, "sha256", signed, false, &[]),
            ),
        ),
        Case {
            // cursive trusts only certificates that may sign others.
            trusted: vec![uuid(RSA)],
            ..no("a trusted leaf is no anchor", rsa("sha256", "SHA-256", &[]))
        },
        no("missing key type", missing),
        no("unsigned image", vec![]),
        no(
            "unsupported hash method",
            props(
                RSA,
                "SHA-1",
                "RSA-PSS",
                &pki.sign(RSA, "sha1", signed, true, &[]),
            ),
        ),
        no(
            "unsupported key type",
            props(
                EC384,
                "SHA-384",
                "ECC_SECP256R1",
                &pki.sign(EC384, "sha384", signed, false, &[]),
            ),
        ),
        no(
            "key type of another key",
            props(
                EC384,
                "SHA-256",
                "RSA-PSS",
                &pki.sign(EC384, "sha256", signed, false, &[]),
            ),
        ),
        no(
            "certificate not found",
            props(99, "SHA-256", "RSA-PSS", &sig256),
        ),
        no(
            "signature not base64",
            props(RSA, "SHA-256", "RSA-PSS", "not base64!"),
        ),
    ]
}

/// imgcache's verdict from a real Glance: the exit code is 0 or 17, and a refusal leaves no
/// trace of the entry in `_base`.
fn imgcache_accepts(pki: &Pki, glance: &glance::RealGlance, id: &str, case: &Case) -> bool {
    let cache = Cache::new();
    let mut cmd = cache.fetch(&glance.url);
    cmd.arg("--verify-signatures")
        .arg("--certificate-dir")
        .arg(pki.certs());
    for t in &case.trusted {
        match t.strip_prefix("file:") {
            Some(uuid) => cmd
                .arg("--trusted-cert")
                .arg(pki.certs().join(format!("{uuid}.pem"))),
            None => cmd.arg("--trusted-cert").arg(t),
        };
    }
    let r = run(cmd.arg(id));
    let entry = support::entry_name(id);
    if r.code == 0 {
        let record = support::record(&cache, id);
        let cert = case
            .props
            .iter()
            .find(|(k, _)| *k == "img_signature_certificate_uuid");
        assert_eq!(
            record["signature_certificate"].as_str(),
            cert.map(|(_, v)| v.as_str()),
            "{}: {record}",
            case.name
        );
        return true;
    }
    r.assert_code(17);
    assert!(r.stderr.contains(id), "{}: {}", case.name, r.stderr);
    assert!(
        r.stderr.contains("signature verification refused"),
        "{}: {}",
        case.name,
        r.stderr
    );
    let left: Vec<String> = cache
        .base_files()
        .into_iter()
        .filter(|f| f.starts_with(&entry))
        .collect();
    assert!(left.is_empty(), "{}: refused, but left {left:?}", case.name);
    false
}

#[test]
fn verdicts_agree_with_cursive_on_every_case() {
    let glance = glance::real();
    let pki = Pki::new();
    // Not a multiple of the 1 MiB pipeline chunk, so the last buffer is a short one.
    let data = support::test_bytes((3 << 20) + 123, 71);
    let signed = pki.path("image.raw");
    std::fs::write(&signed, &data).expect("image");
    let mut disagreements = Vec::new();
    for case in matrix(&pki, &signed, &data) {
        let file = pki.path("held.raw");
        std::fs::write(&file, &case.data).expect("held image");
        let id = glance.upload(&format!("signed {}", case.name), "raw", &file);
        let props: Vec<(&str, &str)> = case.props.iter().map(|(k, v)| (*k, v.as_str())).collect();
        if !props.is_empty() {
            glance.set_properties(&id, &props);
        }
        let (theirs, why) = cursive_accepts(&pki, &file, &case);
        let ours = imgcache_accepts(&pki, glance, &id, &case);
        if theirs != ours || ours != case.accept {
            disagreements.push(format!(
                "{}: expected {}, cursive {} ({why}), imgcache {}",
                case.name, case.accept, theirs, ours
            ));
        }
    }
    assert!(disagreements.is_empty(), "{disagreements:#?}");
}

#[test]
fn a_resumed_download_is_verified_over_all_its_bytes() {
    let glance = glance::real();
    let pki = Pki::new();
    let data = support::test_bytes((2 << 20) + 77, 72);
    let file = pki.path("image.raw");
    std::fs::write(&file, &data).expect("image");
    let sig = pki.sign(RSA, "sha256", &file, true, &[]);
    let id = glance.upload("signed resume", "raw", &file);
    let props = props(RSA, "SHA-256", "RSA-PSS", &sig);
    let props: Vec<(&str, &str)> = props.iter().map(|(k, v)| (*k, v.as_str())).collect();
    glance.set_properties(&id, &props);
    let cache = Cache::new();
    std::fs::create_dir_all(cache.base()).expect("_base");
    // What a killed run left: the first 1.5 MiB, which only the re-hash feeds the signature.
    let part = cache
        .base()
        .join(format!("{}.part", support::entry_name(&id)));
    std::fs::write(&part, &data[..(3 << 19)]).expect("part");
    let r = run(cache
        .fetch(&glance.url)
        .args(["--verify-signatures", "--certificate-dir"])
        .arg(pki.certs())
        .arg(&id));
    r.assert_code(0);
    assert!(r.stderr.contains("resuming"), "{}", r.stderr);
    cache.assert_clean_or_complete(Some(&support::entry_name(&id)));
    // The listing names the certificate, as text and as JSON.
    let list = |json: bool| {
        let mut cmd = support::imgcache();
        cmd.arg("list")
            .arg("--instances-path")
            .arg(cache.instances());
        if json {
            cmd.arg("--json");
        }
        let r = run(&mut cmd);
        r.assert_code(0);
        r.stdout
    };
    assert!(list(false).contains(&uuid(RSA)), "{}", list(false));
    let listing: serde_json::Value = serde_json::from_str(&list(true)).expect("list json");
    assert_eq!(
        listing["entries"][0]["signature_certificate"].as_str(),
        Some(uuid(RSA).as_str())
    );
    // Without --verify-signatures nothing is checked, and the record says so.
    let plain = Cache::new();
    run(plain.fetch(&glance.url).arg(&id)).assert_code(0);
    assert!(support::record(&plain, &id)["signature_certificate"].is_null());
}

#[test]
fn create_refuses_an_unsigned_image_when_verifying() {
    let glance = glance::real();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("image.raw");
    std::fs::write(&file, support::test_bytes(1 << 20, 73)).expect("image");
    let id = glance.upload("unsigned for create", "raw", &file);
    let cache = Cache::new();
    let r = run(cache
        .create(&glance.url, "inst-unsigned", &id)
        .args(["--verify-signatures", "--certificate-dir"])
        .arg(dir.path()));
    r.assert_code(17);
    assert!(
        r.stderr
            .contains("no img_signature_certificate_uuid property"),
        "{}",
        r.stderr
    );
    assert!(cache.base_files().is_empty(), "{:?}", cache.base_files());
    // --trusted-cert alone would silently check nothing: refused as a usage error.
    run(cache
        .fetch(&glance.url)
        .args(["--trusted-cert", "00000001-0000-4000-8000-000000000001"])
        .arg(&id))
    .assert_code(2);
}

/// A Barbican behind the shared Keystone stack, registered as its catalog's `key-manager`.
struct Barbican {
    url: String,
}

static BARBICAN: Service<Barbican> = Service::new(
    "barbican",
    "start",
    "stop",
    "imgcache-barbican-",
    "scripts/barbican/install",
    |s| {
        let url = s.stdout.trim();
        if !url.starts_with("http://127.0.0.1:") || url.lines().count() != 1 {
            return Err(format!("not one base URL: {url:?}"));
        }
        Ok(Barbican {
            url: url.to_owned(),
        })
    },
);

impl Barbican {
    /// Stores a certificate as castellan does (DER, secret type `certificate`) as the demo
    /// user; returns its UUID.
    fn store(&self, token: &str, pem: &Path) -> String {
        let out = Command::new("openssl")
            .args(["x509", "-outform", "DER", "-in"])
            .arg(pem)
            .output()
            .expect("openssl x509");
        support::assert_exit_ok(&out);
        let encoded = Command::new("openssl")
            .args(["base64", "-A"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write;
                child.stdin.take().expect("stdin").write_all(&out.stdout)?;
                child.wait_with_output()
            })
            .expect("openssl base64");
        let body = serde_json::json!({
            "name": "imgcache test certificate",
            "secret_type": "certificate",
            "payload": String::from_utf8_lossy(&encoded.stdout).trim(),
            "payload_content_type": "application/octet-stream",
            "payload_content_encoding": "base64",
        });
        let resp = reqwest::blocking::Client::new()
            .post(format!("{}/v1/secrets", self.url))
            .header("X-Auth-Token", token)
            .header("Content-Type", "application/json")
            .body(body.to_string())
            .send()
            .expect("store secret");
        assert_eq!(resp.status().as_u16(), 201, "{:?}", resp.text());
        let v: serde_json::Value = resp.json().expect("secret json");
        let reference = v["secret_ref"].as_str().expect("secret_ref");
        reference.rsplit('/').next().expect("uuid").to_owned()
    }
}

#[test]
fn certificates_come_from_barbican_through_the_catalog() {
    let stack = crate::keystone::stack();
    let barbican = BARBICAN.start(&[("IMGCACHE_BARBICAN_KEYSTONE_URL", &stack.keystone)]);
    let out = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/barbican/register"))
        .args([&stack.keystone, &barbican.url])
        .output()
        .expect("run scripts/barbican/register");
    support::assert_exit_ok(&out);
    let token = stack.demo_token();
    let pki = Pki::new();
    let signer = barbican.store(&token, &pki.path(&pki.cert(RSA)));
    let ca = barbican.store(&token, &pki.path(&pki.cert(CA)));
    let other_ca = barbican.store(&token, &pki.path(&pki.cert(OTHER_CA)));
    let data = support::test_bytes((1 << 20) + 5, 74);
    let file = pki.path("image.raw");
    std::fs::write(&file, &data).expect("image");
    let id = stack.upload("signed via barbican", "raw", &file);
    let sig = pki.sign(RSA, "sha256", &file, true, &[]);
    let resp = reqwest::blocking::Client::new()
        .patch(format!("{}/v2/images/{id}", stack.glance))
        .header("X-Auth-Token", &token)
        .header(
            "Content-Type",
            "application/openstack-images-v2.1-json-patch",
        )
        .body(
            serde_json::json!([
                {"op": "add", "path": "/img_signature", "value": sig},
                {"op": "add", "path": "/img_signature_hash_method", "value": "SHA-256"},
                {"op": "add", "path": "/img_signature_key_type", "value": "RSA-PSS"},
                {"op": "add", "path": "/img_signature_certificate_uuid", "value": signer},
            ])
            .to_string(),
        )
        .send()
        .expect("patch image");
    assert_eq!(resp.status().as_u16(), 200, "{:?}", resp.text());
    let openrc = stack.env_file("openrc");
    let fetch = |extra: &[&str]| {
        let cache = Cache::new();
        let mut cmd = support::imgcache();
        cmd.arg("fetch")
            .arg("--instances-path")
            .arg(cache.instances())
            .arg("--verify-signatures")
            .args(extra)
            .arg(&id)
            .envs(&openrc);
        (run(&mut cmd), cache)
    };
    // The signing certificate from Barbican, found in the token's catalog.
    let (r, cache) = fetch(&[]);
    r.assert_code(0);
    assert_eq!(
        support::record(&cache, &id)["signature_certificate"].as_str(),
        Some(signer.as_str())
    );
    // Trusted certificates by UUID, from Barbican too: the right CA, then the wrong one.
    fetch(&["--trusted-cert", &ca]).0.assert_code(0);
    let (r, cache) = fetch(&["--trusted-cert", &other_ca]);
    r.assert_code(17);
    assert!(
        r.stderr.contains("does not chain to a trusted certificate"),
        "{}",
        r.stderr
    );
    assert!(cache.base_files().is_empty(), "{:?}", cache.base_files());
}

#[test]
fn the_configuration_file_turns_verification_on() {
    let glance = glance::real();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("image.raw");
    std::fs::write(&file, support::test_bytes(1 << 16, 75)).expect("image");
    let id = glance.upload("unsigned for the config", "raw", &file);
    let config = dir.path().join("imgcache.toml");
    std::fs::write(
        &config,
        format!(
            "verify_signatures = true\ncertificate_dir = {:?}\n",
            dir.path().display().to_string()
        ),
    )
    .expect("config");
    let cache = Cache::new();
    let r = run(cache
        .fetch(&glance.url)
        .arg("--config")
        .arg(&config)
        .arg(&id));
    r.assert_code(17);
    assert!(r.stderr.contains(&id), "{}", r.stderr);
    assert!(cache.base_files().is_empty(), "{:?}", cache.base_files());
    let mut show = support::imgcache();
    show.args(["config", "show", "--config"]).arg(&config);
    let r = run(&mut show);
    r.assert_code(0);
    let line = r
        .stdout
        .lines()
        .find(|l| l.contains("verify_signatures"))
        .unwrap_or_default()
        .to_owned();
    assert!(
        line.contains("true") && line.contains("file:"),
        "{}",
        r.stdout
    );
}
