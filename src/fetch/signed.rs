//! `--verify-signatures` (Nova's `verify_glance_signatures`): before the download, the image's
//! signature properties are read and its certificate fetched (Barbican by UUID, or
//! `--certificate-dir/<uuid>.pem`), its dates checked, and with `--trusted-cert` its chain
//! validated; the hash thread then digests the data for the signature in the same pass as
//! Glance's hash, and the signature is checked before anything is inspected or cached.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use openssl::hash::MessageDigest;

use super::hash::Digests;
use crate::barbican;
use crate::fsutil;
use crate::glance::Image;
use crate::progress::Reporter;
use crate::signature::{self, Certificate, Properties};

/// The largest certificate file read from `--certificate-dir` or `--trusted-cert FILE`.
const MAX_CERT_FILE: u64 = barbican::MAX_PAYLOAD;

/// A `--trusted-cert`: a certificate UUID (fetched like the signing one) or a PEM file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trusted {
    Id(String),
    File(PathBuf),
}

impl Trusted {
    /// A value with a `/` or a `.` is a file (a UUID has neither); anything else an id.
    pub fn parse(s: &str) -> Trusted {
        if s.contains('/') || s.contains('.') {
            Trusted::File(PathBuf::from(s))
        } else {
            Trusted::Id(s.to_owned())
        }
    }
}

/// Where certificates come from and which ones are trusted.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// `--trusted-cert`: when any is given, the signing certificate must chain to one.
    pub trusted: Vec<Trusted>,
    /// `--certificate-dir`: `<uuid>.pem` files instead of Barbican.
    pub certificate_dir: Option<PathBuf>,
    /// Barbican, on the session that reaches Glance (set by the command).
    pub key_manager: Option<Arc<barbican::Client>>,
}

impl Policy {
    /// The certificate known by `uuid` (an id Glance handed us: checked before it names a
    /// file or a URL).
    fn load(&self, uuid: &str) -> Result<Certificate> {
        if uuid.is_empty()
            || uuid.len() > 128
            || !uuid
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(signature::Error::Unreadable {
                cert: format!("{uuid:?}"),
                detail: "not a certificate id (letters, digits, - and _ only)".into(),
            }
            .into());
        }
        let bytes = match (&self.certificate_dir, &self.key_manager) {
            (Some(dir), _) => {
                let path = dir.join(format!("{uuid}.pem"));
                fsutil::read_operator_file(&path, MAX_CERT_FILE).map_err(|e| {
                    signature::Error::Unreadable {
                        cert: uuid.to_owned(),
                        detail: format!("{}: {e}", path.display()),
                    }
                })?
            }
            (None, Some(km)) => km
                .payload(uuid)
                .with_context(|| format!("certificate {uuid}"))?,
            (None, None) => {
                return Err(signature::Error::Unreadable {
                    cert: uuid.to_owned(),
                    detail: "no Barbican and no --certificate-dir to find it in".into(),
                }
                .into());
            }
        };
        Ok(Certificate::parse(uuid, &bytes)?)
    }

    /// The trusted certificates that can be read; one that cannot is skipped with a warning,
    /// as cursive skips it (the chain check then fails unless another one is the issuer).
    fn trusted(&self, rep: &dyn Reporter) -> Vec<Certificate> {
        let mut out = Vec::new();
        for t in &self.trusted {
            let got = match t {
                Trusted::Id(id) => self.load(id),
                Trusted::File(path) => {
                    let name = path.display().to_string();
                    fsutil::read_operator_file(path, MAX_CERT_FILE)
                        .map_err(|e| anyhow::anyhow!("cannot read {name}: {e}"))
                        .and_then(|b| Ok(Certificate::parse(&name, &b)?))
                }
            };
            match got {
                Ok(c) => out.push(c),
                Err(e) => rep.warn(&format!(
                    "skipping trusted certificate: {}",
                    crate::error::chain(&e)
                )),
            }
        }
        out
    }
}

/// A signature ready to be checked once the data has streamed through its hash.
pub struct Check {
    props: Properties,
    cert: Certificate,
}

impl Check {
    /// Reads the image's signature properties and loads and checks its certificate, before a
    /// byte of data is read: all four properties present and known, the certificate within its
    /// dates with a key of the declared type, and chained to a trusted one if any is given.
    pub fn prepare(image: &Image, policy: &Policy, rep: &dyn Reporter) -> Result<Check> {
        let refused = || format!("image {}: signature verification refused", image.id);
        let get = |name: &str| {
            image
                .extra
                .get(name)
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned)
        };
        let props = Properties::from_image(&get).with_context(refused)?;
        let cert = policy.load(&props.certificate).with_context(refused)?;
        cert.check_dates().with_context(refused)?;
        cert.key(props.key_type).with_context(refused)?;
        if !policy.trusted.is_empty() {
            cert.check_chain(&policy.trusted(rep))
                .with_context(refused)?;
        }
        rep.debug(&format!(
            "image {}: signed ({}, {}) by certificate {}; verifying while downloading",
            image.id,
            props.key_type.name(),
            props.hash.name(),
            cert.name
        ));
        Ok(Check { props, cert })
    }

    /// The hash the data streams through for the signature.
    pub fn digest(&self) -> MessageDigest {
        self.props.hash.digest()
    }

    /// Checks the signature over the digest the hash thread computed.
    pub fn verify(&self, id: &str, digests: &Digests) -> Result<()> {
        let refused = || format!("image {id}: signature verification refused");
        let digest = digests
            .signed
            .as_deref()
            .context("no signature digest was computed")
            .with_context(refused)?;
        self.cert
            .verify_digest(&self.props, digest)
            .with_context(refused)?;
        Ok(())
    }
}

impl super::Options {
    /// With `--verify-signatures` and no `--certificate-dir`, certificates come from Barbican
    /// on these settings (found in the catalog at the first certificate needed).
    pub fn with_key_manager(mut self, settings: barbican::Settings) -> super::Options {
        if let Some(policy) = self.signatures.as_mut()
            && policy.certificate_dir.is_none()
        {
            policy.key_manager = Some(Arc::new(barbican::Client::new(settings)));
        }
        self
    }
}

impl super::Build<'_> {
    /// For the record: the certificate that verified the data. Called only after the check
    /// passed, so with verification on it is the image's `img_signature_certificate_uuid`.
    pub(super) fn signature_certificate(&self) -> Option<String> {
        self.opts.signatures.as_ref()?;
        self.image
            .extra
            .get(signature::CERT_UUID)
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
    }
}
