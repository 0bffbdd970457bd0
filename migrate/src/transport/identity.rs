//! The agent's TLS identity: an ECDSA P-256 key and a self-signed certificate, created on first
//! start under `<dir>/identity/`, and the certificate's fingerprint that peers pin.

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Largest identity file accepted (a P-256 certificate is well under 1 KiB).
const MAX_FILE: u64 = 64 * 1024;

/// Why an identity could not be created or loaded.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot create identity directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is {len} bytes, more than {MAX_FILE}")]
    TooLarge { path: PathBuf, len: u64 },
    #[error("{path} exists but {missing} does not")]
    Incomplete { path: PathBuf, missing: PathBuf },
    #[error("cannot generate key or certificate")]
    Generate {
        #[source]
        source: rcgen::Error,
    },
}

/// The key and certificate this agent presents to its peers.
pub struct Identity {
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
    fingerprint: String,
}

impl Clone for Identity {
    fn clone(&self) -> Identity {
        Identity {
            cert: self.cert.clone(),
            key: self.key.clone_key(),
            fingerprint: self.fingerprint.clone(),
        }
    }
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// Hex SHA-256 of a certificate's DER encoding: what peers pin.
pub fn fingerprint(cert_der: &[u8]) -> String {
    hex::encode(Sha256::digest(cert_der))
}

/// True for 64 lowercase hex characters.
pub fn is_fingerprint(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Identity {
    /// Generates a new key and self-signed certificate (subject alternative name `name`).
    pub fn generate(name: &str) -> Result<Identity, IdentityError> {
        let gen = |source| IdentityError::Generate { source };
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen)?;
        let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).map_err(gen)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("mig agent {name}"));
        let cert = params.self_signed(&key).map_err(gen)?;
        Ok(Identity::from_der(cert.der().to_vec(), key.serialize_der()))
    }

    fn from_der(cert: Vec<u8>, key: Vec<u8>) -> Identity {
        let fingerprint = fingerprint(&cert);
        Identity {
            cert: CertificateDer::from(cert),
            key: PrivatePkcs8KeyDer::from(key),
            fingerprint,
        }
    }

    /// Loads `<dir>/identity/{key.der,cert.der}`, creating them (key mode 0600) when neither
    /// exists. One without the other is an error, never silently replaced.
    ///
    /// A new identity is written into `<dir>/identity.new/` and that directory renamed to
    /// `identity` once both files are on disk, so an agent killed while creating it leaves either
    /// no identity (made again at the next start) or a whole one, never a key without its
    /// certificate.
    pub fn load_or_create(dir: &Path, name: &str) -> Result<Identity, IdentityError> {
        let idir = dir.join("identity");
        let key_path = idir.join("key.der");
        let cert_path = idir.join("cert.der");
        match (key_path.exists(), cert_path.exists()) {
            (true, true) => {
                let key = read_limited(&key_path)?;
                let cert = read_limited(&cert_path)?;
                Ok(Identity::from_der(cert, key))
            }
            (false, false) => create(dir, &idir, name),
            (true, false) => Err(IdentityError::Incomplete {
                path: key_path,
                missing: cert_path,
            }),
            (false, true) => Err(IdentityError::Incomplete {
                path: cert_path,
                missing: key_path,
            }),
        }
    }

    /// Hex SHA-256 of the certificate.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    pub(crate) fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }
}

/// Writes a new identity into `<dir>/identity.new` (whatever an interrupted creation left there is
/// removed first) and renames it to `idir`, which may exist only as an empty directory.
fn create(dir: &Path, idir: &Path, name: &str) -> Result<Identity, IdentityError> {
    let staging = dir.join("identity.new");
    let create_dir = |path: &Path| {
        let made = match fs::remove_dir_all(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
        .and_then(|()| fs::create_dir_all(path))
        .and_then(|()| fs::set_permissions(path, fs::Permissions::from_mode(0o700)));
        made.map_err(|source| IdentityError::CreateDir {
            path: path.to_path_buf(),
            source,
        })
    };
    create_dir(&staging)?;
    let id = Identity::generate(name)?;
    write_private(&staging.join("key.der"), id.key.secret_pkcs8_der(), 0o600)?;
    write_private(&staging.join("cert.der"), id.cert.as_ref(), 0o644)?;
    let publish = fs::rename(&staging, idir).and_then(|()| fs::File::open(dir)?.sync_all());
    if let Err(source) = publish {
        let _ = fs::remove_dir_all(&staging);
        return Err(IdentityError::Write {
            path: idir.to_path_buf(),
            source,
        });
    }
    Ok(id)
}

fn read_limited(path: &Path) -> Result<Vec<u8>, IdentityError> {
    let read = |source| IdentityError::Read {
        path: path.to_path_buf(),
        source,
    };
    let len = fs::metadata(path).map_err(read)?.len();
    if len > MAX_FILE {
        return Err(IdentityError::TooLarge {
            path: path.to_path_buf(),
            len,
        });
    }
    fs::read(path).map_err(read)
}

/// Writes a new file atomically, created with `mode` from the start (the key is never readable
/// by others, not even briefly).
fn write_private(path: &Path, data: &[u8], mode: u32) -> Result<(), IdentityError> {
    let write = |source| IdentityError::Write {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(write)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let a = Identity::load_or_create(dir.path(), "host-a").unwrap();
        let b = Identity::load_or_create(dir.path(), "host-a").unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert!(is_fingerprint(a.fingerprint()));
        assert_eq!(a.fingerprint(), fingerprint(b.cert()));
        let mode = fs::metadata(dir.path().join("identity/key.der"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!dir.path().join("identity.new").exists());
        fs::remove_file(dir.path().join("identity/cert.der")).unwrap();
        assert!(matches!(
            Identity::load_or_create(dir.path(), "host-a"),
            Err(IdentityError::Incomplete { .. })
        ));
    }

    #[test]
    fn an_interrupted_creation_is_made_again() {
        let dir = tempfile::tempdir().unwrap();
        // What a kill between the two writes of a creation leaves: a staging directory with the
        // key only, and an empty identity directory (as an older release made first).
        fs::create_dir_all(dir.path().join("identity.new")).unwrap();
        fs::write(dir.path().join("identity.new/key.der"), b"partial").unwrap();
        fs::create_dir_all(dir.path().join("identity")).unwrap();
        let a = Identity::load_or_create(dir.path(), "host-a").unwrap();
        assert!(!dir.path().join("identity.new").exists());
        let b = Identity::load_or_create(dir.path(), "host-a").unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
    }
}
