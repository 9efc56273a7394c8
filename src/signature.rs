//! Glance image signatures, checked the way Nova does it through `cursive`: the image
//! properties (`img_signature*`), the signing certificate (X.509, PEM or DER), its validity
//! dates, its chain to trusted certificates, and the signature over the digest of the image
//! data (RSA-PSS with MGF1 and any salt length, ECDSA on P-384 or P-521, DSA), all with
//! OpenSSL's libcrypto. The digest itself is computed by the caller while the data streams.

use std::cmp::Ordering;

use openssl::asn1::Asn1Time;
use openssl::hash::MessageDigest;
use openssl::md::{Md, MdRef};
use openssl::pkey::{Id, PKey, Public};
use openssl::pkey_ctx::PkeyCtx;
use openssl::rsa::Padding;
use openssl::sign::RsaPssSaltlen;
use openssl::stack::Stack;
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::{X509, X509StoreContext};

use crate::error::Kind;

/// The image properties Glance stores a signature in (cursive's names).
pub const SIGNATURE: &str = "img_signature";
pub const HASH_METHOD: &str = "img_signature_hash_method";
pub const KEY_TYPE: &str = "img_signature_key_type";
pub const CERT_UUID: &str = "img_signature_certificate_uuid";

/// Why a signature (or its certificate) is refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "the image has no {0} property, so its signature cannot be verified; sign it in Glance (docs/operators.md, Signed images) or fetch it without --verify-signatures"
    )]
    Missing(&'static str),
    #[error("{HASH_METHOD} {0:?} is not supported (SHA-224, SHA-256, SHA-384, SHA-512 are)")]
    HashMethod(String),
    #[error("{KEY_TYPE} {0:?} is not supported (RSA-PSS, ECC_SECP384R1, ECC_SECP521R1, DSA are)")]
    KeyType(String),
    #[error("{SIGNATURE} is not valid base64")]
    Base64,
    #[error("certificate {cert}: cannot be read: {detail}")]
    Unreadable { cert: String, detail: String },
    #[error("certificate {cert}: not an X.509 certificate in PEM or DER")]
    NotCertificate { cert: String },
    #[error("certificate {cert}: its public key is not of key type {key_type}")]
    WrongKey { cert: String, key_type: String },
    #[error("certificate {cert}: not valid before {date}; check this host's clock or wait")]
    NotYetValid { cert: String, date: String },
    #[error("certificate {cert}: expired {date}; re-sign the image with a valid certificate")]
    Expired { cert: String, date: String },
    #[error(
        "certificate {cert}: does not chain to a trusted certificate ({detail}); pass its issuer with --trusted-cert if it is to be trusted"
    )]
    Untrusted { cert: String, detail: String },
    #[error(
        "signature does not match the image data (certificate {cert}): the data is not what was signed; the download was discarded"
    )]
    Bad { cert: String },
    #[error("libcrypto failed checking certificate {cert}: {detail}")]
    Crypto { cert: String, detail: String },
}

impl Error {
    /// The exit-code kind: every refusal is a signature failure.
    pub fn kind(&self) -> Kind {
        Kind::Signature
    }
}

/// `img_signature_hash_method`: the hash the signature was made over (cursive's `HASH_METHODS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashMethod {
    Sha224,
    Sha256,
    Sha384,
    Sha512,
}

impl HashMethod {
    /// The property's value, spelled exactly as cursive accepts it.
    pub fn parse(s: &str) -> Option<HashMethod> {
        Some(match s {
            "SHA-224" => HashMethod::Sha224,
            "SHA-256" => HashMethod::Sha256,
            "SHA-384" => HashMethod::Sha384,
            "SHA-512" => HashMethod::Sha512,
            _ => return None,
        })
    }

    /// The property's value.
    pub fn name(self) -> &'static str {
        match self {
            HashMethod::Sha224 => "SHA-224",
            HashMethod::Sha256 => "SHA-256",
            HashMethod::Sha384 => "SHA-384",
            HashMethod::Sha512 => "SHA-512",
        }
    }

    /// The digest to stream the image data through.
    pub fn digest(self) -> MessageDigest {
        match self {
            HashMethod::Sha224 => MessageDigest::sha224(),
            HashMethod::Sha256 => MessageDigest::sha256(),
            HashMethod::Sha384 => MessageDigest::sha384(),
            HashMethod::Sha512 => MessageDigest::sha512(),
        }
    }

    fn md(self) -> &'static MdRef {
        match self {
            HashMethod::Sha224 => Md::sha224(),
            HashMethod::Sha256 => Md::sha256(),
            HashMethod::Sha384 => Md::sha384(),
            HashMethod::Sha512 => Md::sha512(),
        }
    }
}

/// `img_signature_key_type`. cursive also lists binary curves (SECT*), which the cryptography
/// releases it runs on no longer support, so it registers only these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    RsaPss,
    EccSecp384r1,
    EccSecp521r1,
    Dsa,
}

impl KeyType {
    pub fn parse(s: &str) -> Option<KeyType> {
        Some(match s {
            "RSA-PSS" => KeyType::RsaPss,
            "ECC_SECP384R1" => KeyType::EccSecp384r1,
            "ECC_SECP521R1" => KeyType::EccSecp521r1,
            "DSA" => KeyType::Dsa,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            KeyType::RsaPss => "RSA-PSS",
            KeyType::EccSecp384r1 => "ECC_SECP384R1",
            KeyType::EccSecp521r1 => "ECC_SECP521R1",
            KeyType::Dsa => "DSA",
        }
    }

    /// Does `key` belong to this type? As cursive: the key's class decides (an EC key of any
    /// curve the backend supports passes for an `ECC_*` name; the signature check follows).
    fn matches(self, key: &PKey<Public>) -> bool {
        match self {
            KeyType::RsaPss => key.id() == Id::RSA,
            KeyType::Dsa => key.id() == Id::DSA,
            KeyType::EccSecp384r1 | KeyType::EccSecp521r1 => key.id() == Id::EC,
        }
    }
}

/// The signature properties of an image, checked and decoded.
#[derive(Debug, Clone)]
pub struct Properties {
    pub signature: Vec<u8>,
    pub hash: HashMethod,
    pub key_type: KeyType,
    pub certificate: String,
}

impl Properties {
    /// Reads the four properties through `get`; all four are required (cursive's
    /// `get_verifier`), and the names must be ones cursive knows.
    pub fn from_image(get: &dyn Fn(&str) -> Option<String>) -> Result<Properties, Error> {
        let need = |name: &'static str| {
            get(name)
                .filter(|v| !v.is_empty())
                .ok_or(Error::Missing(name))
        };
        let certificate = need(CERT_UUID)?;
        let method = need(HASH_METHOD)?;
        let signature = need(SIGNATURE)?;
        let key_type = need(KEY_TYPE)?;
        Ok(Properties {
            signature: decode_base64(&signature).ok_or(Error::Base64)?,
            hash: HashMethod::parse(&method).ok_or(Error::HashMethod(method))?,
            key_type: KeyType::parse(&key_type).ok_or(Error::KeyType(key_type))?,
            certificate,
        })
    }
}

/// Standard base64 as cursive decodes it (Python's `base64.b64decode`, not validating):
/// characters outside the alphabet (line breaks) are skipped, a padding that completes a
/// group ends the input, and a group left incomplete without it fails.
pub fn decode_base64(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let mut quad = 0;
    let mut pads = 0;
    let mut left: u8 = 0;
    for c in s.bytes() {
        if c == b'=' {
            if quad >= 2 {
                pads += 1;
                if quad + pads >= 4 {
                    return Some(out);
                }
            }
            continue;
        }
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => continue,
        };
        pads = 0;
        match quad {
            0 => left = v,
            1 => {
                out.push((left << 2) | (v >> 4));
                left = v & 0x0f;
            }
            2 => {
                out.push((left << 4) | (v >> 2));
                left = v & 0x03;
            }
            _ => out.push((left << 6) | v),
        }
        quad = (quad + 1) % 4;
    }
    (quad == 0).then_some(out)
}

/// A certificate and the name it is known by in messages (its UUID or file).
pub struct Certificate {
    pub name: String,
    pub x509: X509,
}

impl Certificate {
    /// Parses PEM or DER (Barbican stores a certificate either way; castellan hands DER).
    pub fn parse(name: &str, bytes: &[u8]) -> Result<Certificate, Error> {
        let x509 = if bytes.windows(10).any(|w| w == b"-----BEGIN") {
            X509::from_pem(bytes)
        } else {
            X509::from_der(bytes)
        }
        .map_err(|_| Error::NotCertificate {
            cert: name.to_owned(),
        })?;
        Ok(Certificate {
            name: name.to_owned(),
            x509,
        })
    }

    /// Refuses a certificate outside its validity dates (cursive's `is_within_valid_dates`).
    pub fn check_dates(&self) -> Result<(), Error> {
        let crypto = |e: openssl::error::ErrorStack| self.crypto(e);
        let now = Asn1Time::days_from_now(0).map_err(crypto)?;
        if now.compare(self.x509.not_before()).map_err(crypto)? == Ordering::Less {
            return Err(Error::NotYetValid {
                cert: self.name.clone(),
                date: self.x509.not_before().to_string(),
            });
        }
        if now.compare(self.x509.not_after()).map_err(crypto)? == Ordering::Greater {
            return Err(Error::Expired {
                cert: self.name.clone(),
                date: self.x509.not_after().to_string(),
            });
        }
        Ok(())
    }

    /// Can this certificate sign others? As cursive's `can_sign_certificates`: a basic
    /// constraints extension saying CA and a key usage extension with keyCertSign, both
    /// required (OpenSSL alone would accept a trust anchor without them).
    pub fn can_sign_certificates(&self) -> bool {
        use foreign_types::ForeignTypeRef;
        let ptr = self.x509.as_ref().as_ptr();
        // SAFETY: `ptr` is a valid X509 owned by `self.x509` for the duration of both calls;
        // they only read (and cache) its extensions.
        let (flags, usage) = unsafe {
            (
                openssl_sys::X509_get_extension_flags(ptr),
                openssl_sys::X509_get_key_usage(ptr),
            )
        };
        let has = |f: u32| flags & f == f;
        has(openssl_sys::EXFLAG_BCONS | openssl_sys::EXFLAG_CA)
            && has(openssl_sys::EXFLAG_KUSAGE)
            && usage & openssl_sys::X509v3_KU_KEY_CERT_SIGN != 0
    }

    /// True when the certificate is within its dates (a trusted one that is not is skipped,
    /// as cursive skips it).
    pub fn within_dates(&self) -> bool {
        self.check_dates().is_ok()
    }

    /// Checks that this certificate chains to one of `trusted` (cursive's `verify_certificate`
    /// with `enable_certificate_validation`): every link, the root included, must be among the
    /// trusted certificates, within its dates, a CA allowed to sign certificates, with path
    /// lengths respected. Trusted certificates that are not are left out, as cursive leaves
    /// them out; OpenSSL's X509 verification then builds and checks the chain.
    pub fn check_chain(&self, trusted: &[Certificate]) -> Result<(), Error> {
        let crypto = |e: openssl::error::ErrorStack| self.crypto(e);
        let mut store = X509StoreBuilder::new().map_err(crypto)?;
        let usable = trusted
            .iter()
            .filter(|t| t.within_dates() && t.can_sign_certificates());
        for t in usable {
            store.add_cert(t.x509.clone()).map_err(crypto)?;
        }
        let store = store.build();
        let untrusted = Stack::new().map_err(crypto)?;
        let mut ctx = X509StoreContext::new().map_err(crypto)?;
        let (ok, detail) = ctx
            .init(&store, &self.x509, &untrusted, |c| {
                let ok = c.verify_cert()?;
                Ok((ok, c.error().error_string().to_owned()))
            })
            .map_err(crypto)?;
        if ok {
            Ok(())
        } else {
            Err(Error::Untrusted {
                cert: self.name.clone(),
                detail,
            })
        }
    }

    /// The public key, which must be of `key_type`.
    pub fn key(&self, key_type: KeyType) -> Result<PKey<Public>, Error> {
        let key = self.x509.public_key().map_err(|e| self.crypto(e))?;
        if !key_type.matches(&key) {
            return Err(Error::WrongKey {
                cert: self.name.clone(),
                key_type: key_type.name().to_owned(),
            });
        }
        Ok(key)
    }

    /// Verifies `props.signature` over `digest` (the image data hashed with `props.hash`), as
    /// cursive's verifiers do with `Prehashed`: RSA-PSS with MGF1 of the same hash and the
    /// salt length read from the signature (cryptography's `PSS.MAX_LENGTH` accepts any on
    /// verification), ECDSA and DSA signatures in DER.
    pub fn verify_digest(&self, props: &Properties, digest: &[u8]) -> Result<(), Error> {
        let key = self.key(props.key_type)?;
        let crypto = |e: openssl::error::ErrorStack| self.crypto(e);
        let mut ctx = PkeyCtx::new(&key).map_err(crypto)?;
        ctx.verify_init().map_err(crypto)?;
        ctx.set_signature_md(props.hash.md()).map_err(crypto)?;
        if props.key_type == KeyType::RsaPss {
            ctx.set_rsa_padding(Padding::PKCS1_PSS).map_err(crypto)?;
            ctx.set_rsa_mgf1_md(props.hash.md()).map_err(crypto)?;
            // -2: RSA_PSS_SALTLEN_AUTO, which on verification accepts the salt length the
            // signature carries (cryptography's PSS.MAX_LENGTH does the same).
            ctx.set_rsa_pss_saltlen(RsaPssSaltlen::MAXIMUM_LENGTH)
                .map_err(crypto)?;
        }
        // A malformed signature is an error from libcrypto, not `false`: both are refusals.
        match ctx.verify(digest, &props.signature) {
            Ok(true) => Ok(()),
            Ok(false) | Err(_) => Err(Error::Bad {
                cert: self.name.clone(),
            }),
        }
    }

    fn crypto(&self, e: openssl::error::ErrorStack) -> Error {
        Error::Crypto {
            cert: self.name.clone(),
            detail: e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_as_python_decodes_it() {
        assert_eq!(decode_base64("aGVsbG8=").as_deref(), Some(&b"hello"[..]));
        assert_eq!(decode_base64("aGVs\nbG8=").as_deref(), Some(&b"hello"[..]));
        assert_eq!(decode_base64("aGVsbG8"), None);
        assert_eq!(decode_base64("a==="), None);
        // A completed padding ends the input; extra padding is fine.
        assert_eq!(decode_base64("aGVsbG8=aa").as_deref(), Some(&b"hello"[..]));
        assert_eq!(decode_base64("aGVsbG8==").as_deref(), Some(&b"hello"[..]));
        assert_eq!(decode_base64("aGVsbA==").as_deref(), Some(&b"hell"[..]));
        assert_eq!(decode_base64("").as_deref(), Some(&b""[..]));
    }

    #[test]
    fn names_are_cursive_spellings() {
        assert_eq!(HashMethod::parse("SHA-256"), Some(HashMethod::Sha256));
        assert_eq!(HashMethod::parse("sha256"), None);
        assert_eq!(HashMethod::parse("MD5"), None);
        assert_eq!(KeyType::parse("ECC_SECP384R1"), Some(KeyType::EccSecp384r1));
        assert_eq!(KeyType::parse("ECC_SECP256R1"), None);
    }

    #[test]
    fn every_property_is_required() {
        let all = |name: &str| Some(format!("{name}-value"));
        let props = |skip: &'static str| {
            move |name: &str| {
                if name == skip {
                    None
                } else if name == HASH_METHOD {
                    Some("SHA-256".into())
                } else if name == KEY_TYPE {
                    Some("DSA".into())
                } else if name == SIGNATURE {
                    Some("AAAA".into())
                } else {
                    all(name)
                }
            }
        };
        for name in [SIGNATURE, HASH_METHOD, KEY_TYPE, CERT_UUID] {
            let err = Properties::from_image(&props(name)).unwrap_err();
            assert!(matches!(err, Error::Missing(n) if n == name), "{err}");
        }
        assert!(Properties::from_image(&props("none")).is_ok());
    }
}
