//! The files config: the Llama Stack `remote::s3` provider shape (seed 004) as-is, plus what it
//! lacked: `aws_session_token`, `key_prefix`, `sse`, `max_file_size`, and PostgreSQL as the
//! metadata store. `inline::localfs` (with `storage_dir`) is the embedded local-directory store.
//!
//! ```yaml
//! api: files
//! provider_type: remote::s3
//! config:
//!   bucket_name: "${env.S3_BUCKET_NAME}"
//!   region: "${env.AWS_REGION:=us-east-1}"
//!   aws_access_key_id: "${env.AWS_ACCESS_KEY_ID:=}"
//!   aws_secret_access_key: "${env.AWS_SECRET_ACCESS_KEY:=}"
//!   aws_session_token: "${env.AWS_SESSION_TOKEN:=}"
//!   endpoint_url: "${env.S3_ENDPOINT_URL:=}"
//!   auto_create_bucket: true
//!   key_prefix: files-api/
//!   sse: {type: "aws:kms", kms_key_id: alias/files}
//!   max_file_size: 536870912
//!   metadata_store: {type: postgres, dsn: "postgres://files@db/files"}
//! ```
//!
//! `${env.VAR}` is replaced by the variable (unset or empty = [`FilesError::MissingEnv`]),
//! `${env.VAR:=default}` by the variable or the default, `${env.VAR:+value}` by `value` when the
//! variable is set. Substitution happens in string values after parsing, so a value cannot
//! inject YAML structure. A value that ends up empty counts as not given (so
//! `"${env.AWS_ACCESS_KEY_ID:=}"` means "use the default credential chain").

use std::path::PathBuf;

use serde::{Deserialize, Deserializer};
use serde_yaml_ng::Value;

use crate::error::{FilesError, Result};

/// Default largest file `create` accepts: OpenAI's 512 MB.
pub const DEFAULT_MAX_FILE_SIZE: u64 = 512 * 1024 * 1024;
/// Largest `max_file_size`: 10000 parts of 16 MiB.
pub const MAX_MAX_FILE_SIZE: u64 = 10_000 * 16 * 1024 * 1024;
/// Largest upload (Uploads API): OpenAI's 8 GB.
pub const DEFAULT_MAX_UPLOAD_SIZE: u64 = 8 * 1024 * 1024 * 1024;

fn files_api() -> String {
    "files".into()
}

/// Which provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum ProviderType {
    /// An S3 (or compatible) bucket.
    #[serde(rename = "remote::s3")]
    RemoteS3,
    /// A local directory (the embedded default).
    #[serde(rename = "inline::localfs")]
    InlineLocalfs,
}

/// A secret string: never shown by `Debug`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Server-side encryption algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum SseType {
    /// SSE-S3.
    #[serde(rename = "AES256")]
    Aes256,
    /// SSE-KMS.
    #[serde(rename = "aws:kms")]
    AwsKms,
}

/// Server-side encryption of the objects written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SseConfig {
    /// Algorithm.
    #[serde(rename = "type")]
    pub kind: SseType,
    /// KMS key (only with `aws:kms`; absent = the account's default key).
    pub kms_key_id: Option<String>,
}

/// Where the metadata lives.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum MetadataStore {
    /// A SQLite file (WAL mode, busy timeout).
    Sqlite {
        /// The database file (created when missing).
        db_path: PathBuf,
    },
    /// PostgreSQL.
    Postgres {
        /// `postgres://user:password@host:port/db?sslmode=...`.
        dsn: Secret,
    },
}

/// The provider's settings (`config:`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// Bucket (required for `remote::s3`).
    pub bucket_name: Option<String>,
    /// Region (default `us-east-1`).
    pub region: Option<String>,
    /// Access key id (absent: the default credential chain / IAM role).
    pub aws_access_key_id: Option<Secret>,
    /// Secret access key.
    pub aws_secret_access_key: Option<Secret>,
    /// Session token of temporary credentials.
    pub aws_session_token: Option<Secret>,
    /// Custom endpoint (Garage, MinIO, ...).
    pub endpoint_url: Option<String>,
    /// Create the bucket when it does not exist.
    #[serde(default, deserialize_with = "de_bool")]
    pub auto_create_bucket: bool,
    /// Prefix of every key (`files-api/` → `files-api/files/<id>`).
    pub key_prefix: Option<String>,
    /// Server-side encryption of written objects.
    pub sse: Option<SseConfig>,
    /// Largest file `create` accepts, in bytes (default 512 MiB).
    #[serde(default, deserialize_with = "de_opt_u64")]
    pub max_file_size: Option<u64>,
    /// Largest upload of the Uploads API, in bytes (default 8 GiB).
    #[serde(default, deserialize_with = "de_opt_u64")]
    pub max_upload_size: Option<u64>,
    /// Directory of the `inline::localfs` store.
    pub storage_dir: Option<PathBuf>,
    /// The metadata database.
    pub metadata_store: MetadataStore,
}

/// The Files API configuration (seed-004 shape).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilesConfig {
    /// Always `files` (may be left out).
    #[serde(default = "files_api")]
    pub api: String,
    /// Llama Stack's name of the provider entry (`provider_id: s3-files`), kept for messages.
    #[serde(default)]
    pub provider_id: Option<String>,
    /// `remote::s3` or `inline::localfs`.
    pub provider_type: ProviderType,
    /// Settings.
    pub config: ProviderConfig,
}

impl FilesConfig {
    /// Parses the seed-004 YAML (or JSON) config, with `${env.…}` substitution from the
    /// process environment.
    pub fn from_yaml(text: &str) -> Result<Self> {
        Self::from_yaml_with_env(text, |k| std::env::var(k).ok())
    }

    /// [`Self::from_yaml`] with the environment as a function (for tests).
    pub fn from_yaml_with_env(text: &str, env: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let mut v: Value =
            serde_yaml_ng::from_str(text).map_err(|source| FilesError::ConfigSyntax { source })?;
        substitute(&mut v, "", &env)?;
        let cfg: Self =
            serde_yaml_ng::from_value(v).map_err(|source| FilesError::ConfigSyntax { source })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// No config: the local-directory store `<home>/store` (keys `files/<id>`) and SQLite at
    /// `<home>/files.db`.
    pub fn embedded(paths: &infra_config::Paths) -> Self {
        Self {
            api: "files".into(),
            provider_id: None,
            provider_type: ProviderType::InlineLocalfs,
            config: ProviderConfig {
                bucket_name: None,
                region: None,
                aws_access_key_id: None,
                aws_secret_access_key: None,
                aws_session_token: None,
                endpoint_url: None,
                auto_create_bucket: false,
                key_prefix: None,
                sse: None,
                max_file_size: None,
                max_upload_size: None,
                storage_dir: Some(paths.home.join("store")),
                metadata_store: MetadataStore::Sqlite {
                    db_path: paths.home.join("files.db"),
                },
            },
        }
    }

    /// The key prefix, normalised to end in `/` (empty for none).
    pub fn key_prefix(&self) -> String {
        let p = self.config.key_prefix.as_deref().unwrap_or("");
        let p = p.trim_matches('/');
        if p.is_empty() {
            String::new()
        } else {
            format!("{p}/")
        }
    }

    /// Largest file `create` accepts.
    pub fn max_file_size(&self) -> u64 {
        self.config.max_file_size.unwrap_or(DEFAULT_MAX_FILE_SIZE)
    }

    /// Largest upload of the Uploads API.
    pub fn max_upload_size(&self) -> u64 {
        self.config
            .max_upload_size
            .unwrap_or(DEFAULT_MAX_UPLOAD_SIZE)
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<()> {
        let bad = |field, reason| Err(FilesError::ConfigValue { field, reason });
        let c = &self.config;
        if self.api != "files" {
            return bad("api", "must be \"files\"");
        }
        match self.provider_type {
            ProviderType::RemoteS3 => {
                let Some(b) = &c.bucket_name else {
                    return bad(
                        "config.bucket_name",
                        "is required for remote::s3 (S3 bucket names are global: there is no default)",
                    );
                };
                if infra_store::Location::parse(&format!("s3://{b}")).is_err() || b.contains('/') {
                    return bad(
                        "config.bucket_name",
                        "a bucket name has 3-63 characters: lower-case letters, digits, '-' and '.'",
                    );
                }
                if c.storage_dir.is_some() {
                    return bad("config.storage_dir", "is only for inline::localfs");
                }
            }
            ProviderType::InlineLocalfs => {
                if c.storage_dir.is_none() {
                    return bad("config.storage_dir", "is required for inline::localfs");
                }
                if c.bucket_name.is_some() || c.sse.is_some() || c.auto_create_bucket {
                    return bad(
                        "config.bucket_name",
                        "bucket_name, sse and auto_create_bucket are only for remote::s3",
                    );
                }
            }
        }
        match (&c.aws_access_key_id, &c.aws_secret_access_key) {
            (Some(_), None) | (None, Some(_)) => {
                return bad(
                    "config.aws_access_key_id",
                    "give both aws_access_key_id and aws_secret_access_key, or neither",
                )
            }
            _ => {}
        }
        if c.aws_session_token.is_some() && c.aws_access_key_id.is_none() {
            return bad(
                "config.aws_session_token",
                "a session token goes with aws_access_key_id and aws_secret_access_key",
            );
        }
        if let Some(sse) = &c.sse {
            if sse.kind == SseType::Aes256 && sse.kms_key_id.is_some() {
                return bad("config.sse.kms_key_id", "is only for type aws:kms");
            }
        }
        if let Some(p) = &c.key_prefix {
            let t = p.trim_matches('/');
            if !t.is_empty() && infra_store::check_key(t).is_err() {
                return bad(
                    "config.key_prefix",
                    "must be a relative key prefix without '.', '..', '//' or NUL",
                );
            }
        }
        if let Some(m) = c.max_file_size {
            if m == 0 || m > MAX_MAX_FILE_SIZE {
                return bad(
                    "config.max_file_size",
                    "must be 1 byte to 160 GiB (10000 parts of 16 MiB)",
                );
            }
        }
        if let Some(m) = c.max_upload_size {
            if m == 0 || m > 10_000 * 64 * 1024 * 1024 {
                return bad(
                    "config.max_upload_size",
                    "must be 1 byte to 10000 parts of 64 MiB",
                );
            }
        }
        if let MetadataStore::Sqlite { db_path } = &c.metadata_store {
            let s = db_path.to_string_lossy();
            if s.is_empty() || s.contains(['?', '#']) {
                return bad(
                    "config.metadata_store.db_path",
                    "must be a file path without '?' or '#'",
                );
            }
        }
        Ok(())
    }
}

/// Replaces `${env.…}` in every string of `v`; drops mapping entries that end up empty.
fn substitute(v: &mut Value, at: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<()> {
    match v {
        Value::String(s) => {
            *s = substitute_str(s, at, env)?;
        }
        Value::Sequence(seq) => {
            for (i, x) in seq.iter_mut().enumerate() {
                substitute(x, &format!("{at}[{i}]"), env)?;
            }
        }
        Value::Mapping(m) => {
            let mut empty = Vec::new();
            for (k, x) in m.iter_mut() {
                let name = k.as_str().unwrap_or("?");
                let path = if at.is_empty() {
                    name.to_string()
                } else {
                    format!("{at}.{name}")
                };
                substitute(x, &path, env)?;
                if matches!(x, Value::String(s) if s.is_empty()) {
                    empty.push(k.clone());
                }
            }
            for k in empty {
                m.remove(&k);
            }
        }
        Value::Tagged(t) => substitute(&mut t.value, at, env)?,
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
    Ok(())
}

fn substitute_str(s: &str, at: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String> {
    let bad = || FilesError::BadPlaceholder { at: at.to_string() };
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let end = after.find('}').ok_or_else(bad)?;
        let inner = &after[..end];
        let spec = inner.strip_prefix("env.").ok_or_else(bad)?;
        let (var, op) = match spec.find(':') {
            Some(j) => (&spec[..j], Some(&spec[j..])),
            None => (spec, None),
        };
        if var.is_empty() || !var.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(bad());
        }
        let val = env(var).filter(|v| !v.is_empty());
        let piece = match op {
            None => val.ok_or_else(|| FilesError::MissingEnv {
                var: var.to_string(),
                at: at.to_string(),
            })?,
            Some(op) => {
                if let Some(default) = op.strip_prefix(":=") {
                    val.unwrap_or_else(|| default.to_string())
                } else if let Some(alt) = op.strip_prefix(":+") {
                    if val.is_some() {
                        alt.to_string()
                    } else {
                        String::new()
                    }
                } else {
                    return Err(bad());
                }
            }
        };
        out.push_str(&piece);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A bool, or a string `true`/`false` (what `${env.X:=false}` yields).
fn de_bool<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<bool, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum B {
        B(bool),
        S(String),
    }
    match B::deserialize(d)? {
        B::B(b) => Ok(b),
        B::S(s) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" => Ok(true),
            "false" | "0" | "no" => Ok(false),
            _ => Err(serde::de::Error::custom(format!(
                "expected true or false, got {s:?}"
            ))),
        },
    }
}

/// An integer, or a string of digits (what `${env.X:=123}` yields).
fn de_opt_u64<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum N {
        N(u64),
        S(String),
    }
    match Option::<N>::deserialize(d)? {
        None => Ok(None),
        Some(N::N(n)) => Ok(Some(n)),
        Some(N::S(s)) => s
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| serde::de::Error::custom(format!("expected a byte count, got {s:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    /// The seed's examples, verbatim.
    const SEED_BASIC: &str = "api: files
provider_type: remote::s3
config:
  bucket_name: my-llama-stack-files
  region: us-east-1
  metadata_store:
    type: sqlite
    db_path: ./s3_files_metadata.db
";
    const SEED_ADVANCED: &str = "api: files
provider_type: remote::s3
config:
  bucket_name: my-llama-stack-files
  region: us-east-1
  aws_access_key_id: YOUR_ACCESS_KEY
  aws_secret_access_key: YOUR_SECRET_KEY
  endpoint_url: https://s3.amazonaws.com # Optional for custom endpoints
  metadata_store:
    type: sqlite
    db_path: ./s3_files_metadata.db
";
    const SEED_ENV: &str = "api: files
provider_type: remote::s3
config:
  bucket_name: \"${env.S3_BUCKET_NAME}\"
  region: \"${env.AWS_REGION:=us-east-1}\"
  aws_access_key_id: \"${env.AWS_ACCESS_KEY_ID:=}\"
  aws_secret_access_key: \"${env.AWS_SECRET_ACCESS_KEY:=}\"
  endpoint_url: \"${env.S3_ENDPOINT_URL:=}\"
  auto_create_bucket: true
  metadata_store:
    type: sqlite
    db_path: ./s3_files_metadata.db
";

    #[test]
    fn seed_examples_parse() {
        let c = FilesConfig::from_yaml_with_env(SEED_BASIC, env(&[])).unwrap();
        assert_eq!(c.provider_type, ProviderType::RemoteS3);
        assert_eq!(
            c.config.bucket_name.as_deref(),
            Some("my-llama-stack-files")
        );
        assert_eq!(c.config.region.as_deref(), Some("us-east-1"));
        assert_eq!(
            c.config.metadata_store,
            MetadataStore::Sqlite {
                db_path: "./s3_files_metadata.db".into()
            }
        );
        assert!(!c.config.auto_create_bucket);
        assert_eq!(c.key_prefix(), "");
        assert_eq!(c.max_file_size(), DEFAULT_MAX_FILE_SIZE);

        let c = FilesConfig::from_yaml_with_env(SEED_ADVANCED, env(&[])).unwrap();
        assert_eq!(
            c.config.aws_access_key_id,
            Some(Secret("YOUR_ACCESS_KEY".into()))
        );
        assert_eq!(
            c.config.endpoint_url.as_deref(),
            Some("https://s3.amazonaws.com")
        );
        assert!(!format!("{c:?}").contains("YOUR_SECRET_KEY"));
    }

    #[test]
    fn env_substitution() {
        // Unset variable without default: a clear error naming it.
        let e = FilesConfig::from_yaml_with_env(SEED_ENV, env(&[])).unwrap_err();
        assert!(
            matches!(&e, FilesError::MissingEnv { var, at } if var == "S3_BUCKET_NAME" && at == "config.bucket_name"),
            "{e}"
        );
        assert!(e.to_string().contains("S3_BUCKET_NAME"));
        // Defaults; empty defaults mean "not given".
        let c =
            FilesConfig::from_yaml_with_env(SEED_ENV, env(&[("S3_BUCKET_NAME", "bkt")])).unwrap();
        assert_eq!(c.config.bucket_name.as_deref(), Some("bkt"));
        assert_eq!(c.config.region.as_deref(), Some("us-east-1"));
        assert_eq!(c.config.aws_access_key_id, None);
        assert_eq!(c.config.endpoint_url, None);
        assert!(c.config.auto_create_bucket);
        // Set variables win.
        let c = FilesConfig::from_yaml_with_env(
            SEED_ENV,
            env(&[
                ("S3_BUCKET_NAME", "bkt"),
                ("AWS_REGION", "garage"),
                ("AWS_ACCESS_KEY_ID", "id"),
                ("AWS_SECRET_ACCESS_KEY", "secret"),
                ("S3_ENDPOINT_URL", "http://127.0.0.1:3900"),
            ]),
        )
        .unwrap();
        assert_eq!(c.config.region.as_deref(), Some("garage"));
        assert_eq!(
            c.config.aws_secret_access_key,
            Some(Secret("secret".into()))
        );
        assert_eq!(
            c.config.endpoint_url.as_deref(),
            Some("http://127.0.0.1:3900")
        );
        // Several placeholders in one value, :+, typed values from strings; a value cannot
        // inject YAML.
        let text = "api: files
provider_type: remote::s3
config:
  bucket_name: b-${env.ENV}-${env.N:=1}
  key_prefix: \"${env.PFX:+tenant/}x\"
  auto_create_bucket: \"${env.CREATE:=false}\"
  max_file_size: \"${env.MAX:=1048576}\"
  region: \"${env.INJECT}\"
  sse: {type: \"aws:kms\", kms_key_id: \"alias/k\"}
  aws_access_key_id: a
  aws_secret_access_key: s
  aws_session_token: \"${env.TOKEN}\"
  metadata_store: {type: postgres, dsn: \"${env.DSN}\"}
";
        let c = FilesConfig::from_yaml_with_env(
            text,
            env(&[
                ("ENV", "prod"),
                ("PFX", "1"),
                ("INJECT", "x\nbucket_name: evil"),
                ("TOKEN", "tok"),
                ("DSN", "postgres://u:p@h/db"),
            ]),
        )
        .unwrap();
        assert_eq!(c.config.bucket_name.as_deref(), Some("b-prod-1"));
        assert_eq!(c.key_prefix(), "tenant/x/");
        assert!(!c.config.auto_create_bucket);
        assert_eq!(c.max_file_size(), 1_048_576);
        assert_eq!(c.config.region.as_deref(), Some("x\nbucket_name: evil"));
        assert_eq!(c.config.aws_session_token, Some(Secret("tok".into())));
        assert_eq!(
            c.config.sse,
            Some(SseConfig {
                kind: SseType::AwsKms,
                kms_key_id: Some("alias/k".into())
            })
        );
        assert!(matches!(
            c.config.metadata_store,
            MetadataStore::Postgres { .. }
        ));
        // Malformed placeholders.
        for bad in ["${env.}", "${HOME}", "${env.A", "${env.A:-x}", "${env.A B}"] {
            let text = format!(
                "api: files\nprovider_type: remote::s3\nconfig:\n  bucket_name: \"{bad}\"\n  metadata_store: {{type: sqlite, db_path: x.db}}\n"
            );
            let e = FilesConfig::from_yaml_with_env(&text, env(&[("A", "a")])).unwrap_err();
            assert!(matches!(e, FilesError::BadPlaceholder { .. }), "{bad}: {e}");
        }
    }

    #[test]
    fn llama_stack_provider_entry() {
        // A provider entry of a Llama Stack run.yaml: provider_id, no api.
        let text = "provider_id: s3-files
provider_type: remote::s3
config:
  bucket_name: bkt
  metadata_store: {type: sqlite, db_path: /var/lib/files.db}
";
        let c = FilesConfig::from_yaml_with_env(text, env(&[])).unwrap();
        assert_eq!(c.api, "files");
        assert_eq!(c.provider_id.as_deref(), Some("s3-files"));
    }

    #[test]
    fn json_and_refusals() {
        let json = r#"{"api":"files","provider_type":"remote::s3","config":{"bucket_name":"bkt","metadata_store":{"type":"sqlite","db_path":"/x/f.db"}}}"#;
        assert!(FilesConfig::from_yaml_with_env(json, env(&[])).is_ok());
        let cases = [
            r#"{"api":"files","provider_type":"remote::s3","config":{"metadata_store":{"type":"sqlite","db_path":"f.db"}}}"#,
            r#"{"api":"vector_io","provider_type":"remote::s3","config":{"bucket_name":"bkt","metadata_store":{"type":"sqlite","db_path":"f.db"}}}"#,
            r#"{"api":"files","provider_type":"remote::gcs","config":{"bucket_name":"bkt","metadata_store":{"type":"sqlite","db_path":"f.db"}}}"#,
            r#"{"api":"files","provider_type":"remote::s3","config":{"bucket_name":"Bad_Bucket","metadata_store":{"type":"sqlite","db_path":"f.db"}}}"#,
            r#"{"api":"files","provider_type":"remote::s3","config":{"bucket_name":"bkt","key_prefix":"a/../b","metadata_store":{"type":"sqlite","db_path":"f.db"}}}"#,
            r#"{"api":"files","provider_type":"remote::s3","config":{"bucket_name":"bkt","aws_access_key_id":"a","metadata_store":{"type":"sqlite","db_path":"f.db"}}}"#,
            r#"{"api":"files","provider_type":"remote::s3","config":{"bucket_name":"bkt","sse":{"type":"AES256","kms_key_id":"k"},"metadata_store":{"type":"sqlite","db_path":"f.db"}}}"#,
            r#"{"api":"files","provider_type":"remote::s3","config":{"bucket_name":"bkt","max_file_size":0,"metadata_store":{"type":"sqlite","db_path":"f.db"}}}"#,
            r#"{"api":"files","provider_type":"remote::s3","config":{"bucket_name":"bkt","typo":1,"metadata_store":{"type":"sqlite","db_path":"f.db"}}}"#,
            r#"{"api":"files","provider_type":"remote::s3","config":{"bucket_name":"bkt","metadata_store":{"type":"mysql","dsn":"x"}}}"#,
        ];
        for text in cases {
            let e = FilesConfig::from_yaml_with_env(text, env(&[])).unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::Internal, "{text}: {e}");
        }
    }

    #[test]
    fn embedded_defaults() {
        let paths = infra_config::Paths::under("/h");
        let c = FilesConfig::embedded(&paths);
        assert!(c.validate().is_ok());
        assert_eq!(
            c.config.storage_dir.as_deref(),
            Some(std::path::Path::new("/h/store"))
        );
        assert_eq!(
            c.config.metadata_store,
            MetadataStore::Sqlite {
                db_path: "/h/files.db".into()
            }
        );
    }
}
