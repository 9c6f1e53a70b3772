//! API keys: bearer tokens, stored as sha256 hashes in `<home>/api-keys.json` (mode 0600),
//! managed with `infra.operator api keys create|list|revoke`.
//!
//! A token is `sk-io-` and 64 hex digits (256 random bits from the OS), shown once at creation.
//! Only its hash is kept, so the file does not let anyone call the API. A request's token is
//! hashed and compared with every active key's hash in constant time. The server re-reads the
//! file when it changes, so a revoked key stops working without a restart.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Prefix of every token.
pub const TOKEN_PREFIX: &str = "sk-io-";

/// One key as stored (no secret).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApiKey {
    /// `key_…`: how `list` and `revoke` name it.
    pub id: String,
    /// A label chosen at creation.
    pub name: String,
    /// The token's first characters, to recognise it.
    pub prefix: String,
    /// Hex sha256 of the token.
    pub sha256: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds, when revoked.
    pub revoked_at: Option<i64>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct KeyFile {
    keys: Vec<ApiKey>,
}

/// Why a key operation failed.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key file cannot be read or written.
    #[error("cannot use the API key file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The key file is not valid JSON of the expected shape.
    #[error("the API key file {path} is corrupt ({source}); restore it or remove it and create new keys")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
    /// No key has this id or prefix.
    #[error("no API key '{0}'; see `infra.operator api keys list`")]
    Unknown(String),
    /// The name is empty or too long.
    #[error("key name must be 1 to 64 printable characters")]
    BadName,
}

impl KeyError {
    /// The kind of this failure (every variant named).
    pub fn kind(&self) -> infra_config::ErrorKind {
        use infra_config::ErrorKind as K;
        match self {
            Self::Io { .. } => K::Prerequisite,
            Self::Corrupt { .. } => K::Failure,
            Self::Unknown(_) => K::NotFound,
            Self::BadName => K::Usage,
        }
    }
}

/// The active keys as read, with the file's mtime and length then.
type Snapshot = (Option<SystemTime>, u64, Vec<ApiKey>);

/// The key file, re-read when it changes.
#[derive(Debug)]
pub struct KeyStore {
    path: PathBuf,
    cache: Mutex<Option<Snapshot>>,
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

impl KeyStore {
    /// The key file of this home.
    pub fn new(home: &Path) -> Self {
        Self {
            path: home.join("api-keys.json"),
            cache: Mutex::new(None),
        }
    }

    /// Where keys are kept.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn read(&self) -> Result<Vec<ApiKey>, KeyError> {
        match std::fs::read(&self.path) {
            Ok(b) => serde_json::from_slice::<KeyFile>(&b)
                .map(|f| f.keys)
                .map_err(|source| KeyError::Corrupt {
                    path: self.path.clone(),
                    source,
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(source) => Err(KeyError::Io {
                path: self.path.clone(),
                source,
            }),
        }
    }

    fn write(&self, keys: Vec<ApiKey>) -> Result<(), KeyError> {
        let io = |source| KeyError::Io {
            path: self.path.clone(),
            source,
        };
        let body = serde_json::to_vec_pretty(&KeyFile { keys }).expect("keys serialize");
        infra_config::write_atomic(&self.path, &body).map_err(io)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o600)).map_err(io)
    }

    /// Creates a key; returns it and the token (shown once, never stored).
    pub fn create(&self, name: &str) -> Result<(ApiKey, String), KeyError> {
        if name.is_empty() || name.chars().count() > 64 || name.chars().any(char::is_control) {
            return Err(KeyError::BadName);
        }
        let mut secret = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut secret);
        let token = format!("{TOKEN_PREFIX}{}", hex::encode(secret));
        let sha = hash(&token);
        let key = ApiKey {
            id: format!("key_{}", &sha[..16]),
            name: name.to_string(),
            prefix: token[..TOKEN_PREFIX.len() + 6].to_string(),
            sha256: sha,
            created_at: now(),
            revoked_at: None,
        };
        let mut keys = self.read()?;
        keys.push(key.clone());
        self.write(keys)?;
        Ok((key, token))
    }

    /// All keys, revoked ones included.
    pub fn list(&self) -> Result<Vec<ApiKey>, KeyError> {
        self.read()
    }

    /// Revokes a key by id (or its token prefix); returns it.
    pub fn revoke(&self, id: &str) -> Result<ApiKey, KeyError> {
        let mut keys = self.read()?;
        let k = keys
            .iter_mut()
            .find(|k| k.id == id || (id.len() > TOKEN_PREFIX.len() && k.prefix == id))
            .ok_or_else(|| KeyError::Unknown(id.to_string()))?;
        if k.revoked_at.is_none() {
            k.revoked_at = Some(now());
        }
        let out = k.clone();
        self.write(keys)?;
        Ok(out)
    }

    /// Number of active keys.
    pub fn active(&self) -> Result<usize, KeyError> {
        Ok(self.current()?.len())
    }

    /// Active keys, re-read when the file changed.
    fn current(&self) -> Result<Vec<ApiKey>, KeyError> {
        let meta = std::fs::metadata(&self.path).ok();
        let stamp = (
            meta.as_ref().and_then(|m| m.modified().ok()),
            meta.as_ref().map_or(0, |m| m.len()),
        );
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((t, l, keys)) = cache.as_ref() {
            if (*t, *l) == stamp && stamp.0.is_some() {
                return Ok(keys.clone());
            }
        }
        let keys: Vec<ApiKey> = self
            .read()?
            .into_iter()
            .filter(|k| k.revoked_at.is_none())
            .collect();
        *cache = Some((stamp.0, stamp.1, keys.clone()));
        Ok(keys)
    }

    /// The active key this token belongs to, if any (constant-time comparison of hashes).
    pub fn verify(&self, token: &str) -> Result<Option<ApiKey>, KeyError> {
        let h = hash(token);
        let mut found = None;
        for k in self.current()? {
            if bool::from(k.sha256.as_bytes().ct_eq(h.as_bytes())) {
                found = Some(k);
            }
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_verify_revoke() {
        let d = tempfile::tempdir().unwrap();
        let s = KeyStore::new(d.path());
        let (k, token) = s.create("ci").unwrap();
        assert!(token.starts_with(TOKEN_PREFIX) && token.len() == TOKEN_PREFIX.len() + 64);
        let text = std::fs::read_to_string(s.path()).unwrap();
        assert!(
            !text.contains(&token[TOKEN_PREFIX.len()..]),
            "the secret is not stored"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(s.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(s.verify(&token).unwrap().unwrap().id, k.id);
        assert!(s.verify("sk-io-00").unwrap().is_none());
        assert!(
            s.verify(&k.sha256).unwrap().is_none(),
            "the hash is not a token"
        );
        s.revoke(&k.id).unwrap();
        assert!(
            s.verify(&token).unwrap().is_none(),
            "revoked keys stop at once"
        );
        assert!(matches!(s.revoke("key_nope"), Err(KeyError::Unknown(_))));
        assert!(matches!(s.create(""), Err(KeyError::BadName)));
    }
}
