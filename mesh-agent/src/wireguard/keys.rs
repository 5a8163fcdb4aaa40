//! The node's WireGuard key pair: made on first start, kept on disk (0600, never logged,
//! never in an API object), replaced on rotation.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use boringtun::x25519::{PublicKey, StaticSecret};

/// Errors of key handling.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key file could not be read or written.
    #[error("{action} WireGuard key {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The key file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The key file does not hold a base64 32-byte key.
    #[error("WireGuard key {path} is not a base64-encoded 32-byte key")]
    Malformed {
        /// The key file.
        path: PathBuf,
    },
}

/// A public key as WireGuard tools print it (base64).
pub fn encode(key: &[u8; 32]) -> String {
    STANDARD.encode(key)
}

/// Parses a base64 public key.
pub fn decode(text: &str) -> Option<[u8; 32]> {
    STANDARD.decode(text.trim()).ok()?.try_into().ok()
}

/// The node's private key and the file it lives in.
pub struct NodeKey {
    path: PathBuf,
    secret: StaticSecret,
}

impl NodeKey {
    /// Loads the key from `path`, or makes one and stores it there.
    pub fn load_or_create(path: &Path) -> Result<Self, KeyError> {
        match fs::read_to_string(path) {
            Ok(text) => {
                let bytes =
                    decode(&text).ok_or_else(|| KeyError::Malformed { path: path.into() })?;
                // Tighten a key file someone loosened.
                let _ = fs::set_permissions(path, fs::Permissions::from_mode(0o600));
                Ok(NodeKey {
                    path: path.into(),
                    secret: StaticSecret::from(bytes),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = NodeKey {
                    path: path.into(),
                    secret: StaticSecret::random_from_rng(rand_core::OsRng),
                };
                key.store()?;
                Ok(key)
            }
            Err(source) => Err(KeyError::Io {
                action: "read",
                path: path.into(),
                source,
            }),
        }
    }

    /// Replaces the key with a new one, on disk first so a crash keeps the new key.
    pub fn rotate(&mut self) -> Result<(), KeyError> {
        let next = NodeKey {
            path: self.path.clone(),
            secret: StaticSecret::random_from_rng(rand_core::OsRng),
        };
        next.store()?;
        *self = next;
        Ok(())
    }

    /// The private key.
    pub fn secret(&self) -> StaticSecret {
        self.secret.clone()
    }

    /// The public key.
    pub fn public(&self) -> PublicKey {
        PublicKey::from(&self.secret)
    }

    fn store(&self) -> Result<(), KeyError> {
        let io = |action, source| KeyError::Io {
            action,
            path: self.path.clone(),
            source,
        };
        if let Some(dir) = self.path.parent() {
            fs::create_dir_all(dir).map_err(|e| io("create directory for", e))?;
        }
        let tmp = self.path.with_extension("tmp");
        let _ = fs::remove_file(&tmp);
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| io("create", e))?;
        file.write_all(encode(&self.secret.to_bytes()).as_bytes())
            .map_err(|e| io("write", e))?;
        file.sync_all().map_err(|e| io("sync", e))?;
        fs::rename(&tmp, &self.path).map_err(|e| io("rename", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wireguard_key_is_created_0600_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wg/private.key");
        let first = NodeKey::load_or_create(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = NodeKey::load_or_create(&path).unwrap();
        assert_eq!(first.public().as_bytes(), again.public().as_bytes());
        let mut rotated = again;
        rotated.rotate().unwrap();
        assert_ne!(rotated.public().as_bytes(), first.public().as_bytes());
        assert_eq!(
            NodeKey::load_or_create(&path).unwrap().public().as_bytes(),
            rotated.public().as_bytes()
        );
    }

    #[test]
    fn wireguard_key_malformed_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("private.key");
        fs::write(&path, "not a key").unwrap();
        let err = NodeKey::load_or_create(&path).err().unwrap();
        assert!(err.to_string().contains("private.key"), "{err}");
    }

    #[test]
    fn wireguard_public_key_round_trips_base64() {
        let key = [7u8; 32];
        assert_eq!(decode(&encode(&key)), Some(key));
        assert_eq!(decode("short"), None);
    }
}
