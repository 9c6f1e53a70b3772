//! Where the store is and how to reach it, resolved once: flags → environment → config file →
//! defaults.
//!
//! | setting | flag | environment | config file (`[store]`) | default |
//! |---|---|---|---|---|
//! | bucket | `--bucket/-b s3://NAME[/PREFIX]` | `BUCKET`, `S3_BUCKET` | `bucket` | local store `<home>/store` |
//! | region | `--region` | `AWS_REGION`, `AWS_DEFAULT_REGION` | `region` | the profile's, else `us-east-1` |
//! | endpoint | `--endpoint-url` | `S3_ENDPOINT_URL`, `AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL` | `endpoint_url` | AWS |
//! | profile | `--profile` | `AWS_PROFILE` | `profile` | `default` |
//!
//! The config file is `$INFRA_OPERATOR_CONFIG`, else `<home>/config.toml`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use infra_config::Paths;
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::local::LocalStore;
use crate::object::ObjectStore;
use crate::s3::{normalize_prefix, S3Settings, S3Store};
use crate::transfer::TransferOptions;

/// Environment variable naming the config file.
pub const CONFIG_ENV: &str = "INFRA_OPERATOR_CONFIG";

/// A store location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// `s3://bucket/prefix/`.
    S3 {
        /// Bucket.
        bucket: String,
        /// Prefix (`dev/`), possibly empty.
        prefix: String,
    },
    /// A local directory store.
    Local {
        /// Root directory.
        root: PathBuf,
        /// Prefix inside it.
        prefix: String,
    },
}

impl Location {
    /// Parses `s3://NAME[/PREFIX]`, a bare bucket name (`NAME[/PREFIX]`), `file:///DIR` or a
    /// path starting with `/` or `.` (a local store).
    pub fn parse(value: &str) -> Result<Self> {
        let v = value.trim();
        if let Some(rest) = v.strip_prefix("s3://") {
            return Self::s3(value, rest);
        }
        if let Some(p) = v.strip_prefix("file://") {
            return Ok(Self::Local {
                root: PathBuf::from(p),
                prefix: String::new(),
            });
        }
        if v.starts_with('/') || v.starts_with('.') {
            return Ok(Self::Local {
                root: PathBuf::from(v),
                prefix: String::new(),
            });
        }
        if v.contains("://") {
            return Err(Error::Invalid {
                what: "bucket",
                value: value.into(),
                reason: "use s3://NAME[/PREFIX], file:///DIR or a path".into(),
            });
        }
        Self::s3(value, v)
    }

    fn s3(original: &str, rest: &str) -> Result<Self> {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let ok = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && !bucket.starts_with(['-', '.'])
            && !bucket.ends_with(['-', '.']);
        if !ok {
            return Err(Error::Invalid {
                what: "bucket",
                value: original.into(),
                reason: "a bucket name has 3-63 characters: lower-case letters, digits, '-' and \
                         '.', starting and ending with a letter or digit"
                    .into(),
            });
        }
        Ok(Self::S3 {
            bucket: bucket.to_string(),
            prefix: normalize_prefix(prefix),
        })
    }

    /// `s3://bucket/prefix/` or the local directory.
    pub fn display(&self) -> String {
        match self {
            Self::S3 { bucket, prefix } => format!("s3://{bucket}/{prefix}"),
            Self::Local { root, prefix } => format!("{}/{prefix}", root.display()),
        }
    }
}

/// Where the bucket setting came from (shown by `store ls` and in errors).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// `--bucket`.
    Flag,
    /// An environment variable.
    Env(&'static str),
    /// The config file.
    File(PathBuf),
    /// Nothing configured: the embedded local store.
    Default,
}

/// Values given on the command line.
#[derive(Debug, Clone, Default)]
pub struct StoreFlags {
    /// `--bucket`.
    pub bucket: Option<String>,
    /// `--region`.
    pub region: Option<String>,
    /// `--endpoint-url`.
    pub endpoint_url: Option<String>,
    /// `--profile`.
    pub profile: Option<String>,
    /// `--part-size` in MiB.
    pub part_size_mib: Option<u64>,
    /// `--concurrency`.
    pub concurrency: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    store: FileStore,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileStore {
    bucket: Option<String>,
    region: Option<String>,
    endpoint_url: Option<String>,
    profile: Option<String>,
    part_size_mib: Option<u64>,
    concurrency: Option<usize>,
}

/// The resolved store configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// Where.
    pub location: Location,
    /// Where the location came from.
    pub origin: Origin,
    /// Region (`None`: the profile's, else `us-east-1`).
    pub region: Option<String>,
    /// Custom endpoint (path-style addressing).
    pub endpoint_url: Option<String>,
    /// Profile.
    pub profile: Option<String>,
    /// Part size in bytes (`None`: automatic).
    pub part_size: Option<u64>,
    /// Parts in flight.
    pub concurrency: usize,
    /// Directory for resume state (`<cache>/store`).
    pub state_dir: PathBuf,
}

impl StoreConfig {
    /// Resolves from the process environment.
    pub fn from_env(flags: &StoreFlags, paths: &Paths) -> Result<Self> {
        Self::resolve(flags, |k| std::env::var(k).ok(), paths)
    }

    /// Pure resolution (the environment is a function, for tests).
    pub fn resolve(
        flags: &StoreFlags,
        env: impl Fn(&str) -> Option<String>,
        paths: &Paths,
    ) -> Result<Self> {
        let env = |k: &str| env(k).filter(|v| !v.trim().is_empty());
        let file_path = env(CONFIG_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| paths.home.join("config.toml"));
        let file = read_file(&file_path)?;
        let fs = file.store;

        let (bucket, origin) = if let Some(b) = &flags.bucket {
            (Some(b.clone()), Origin::Flag)
        } else if let Some(b) = env("BUCKET") {
            (Some(b), Origin::Env("BUCKET"))
        } else if let Some(b) = env("S3_BUCKET") {
            (Some(b), Origin::Env("S3_BUCKET"))
        } else if let Some(b) = fs.bucket.clone() {
            (Some(b), Origin::File(file_path.clone()))
        } else {
            (None, Origin::Default)
        };
        let location = match bucket {
            Some(b) => Location::parse(&b)?,
            None => Location::Local {
                root: paths.home.join("store"),
                prefix: String::new(),
            },
        };
        let region = flags
            .region
            .clone()
            .or_else(|| env("AWS_REGION"))
            .or_else(|| env("AWS_DEFAULT_REGION"))
            .or(fs.region);
        let endpoint_url = flags
            .endpoint_url
            .clone()
            .or_else(|| env("S3_ENDPOINT_URL"))
            .or_else(|| env("AWS_ENDPOINT_URL_S3"))
            .or_else(|| env("AWS_ENDPOINT_URL"))
            .or(fs.endpoint_url);
        let profile = flags
            .profile
            .clone()
            .or_else(|| env("AWS_PROFILE"))
            .or(fs.profile);
        let part_size = flags
            .part_size_mib
            .or(fs.part_size_mib)
            .map(|m| m * 1024 * 1024);
        let concurrency = flags
            .concurrency
            .or(fs.concurrency)
            .unwrap_or(crate::transfer::DEFAULT_CONCURRENCY);
        if concurrency == 0 || concurrency > 64 {
            return Err(Error::Invalid {
                what: "concurrency",
                value: concurrency.to_string(),
                reason: "use 1 to 64".into(),
            });
        }
        Ok(Self {
            location,
            origin,
            region,
            endpoint_url,
            profile,
            part_size,
            concurrency,
            state_dir: paths.cache.join("store"),
        })
    }

    /// The same settings for another location (sync to a second bucket).
    pub fn with_location(&self, location: Location) -> Self {
        Self {
            location,
            origin: Origin::Flag,
            ..self.clone()
        }
    }

    /// S3 settings, when the location is a bucket.
    pub fn s3_settings(&self) -> Option<S3Settings> {
        match &self.location {
            Location::S3 { bucket, prefix } => Some(S3Settings {
                region: self.region.clone(),
                endpoint: self.endpoint_url.clone(),
                profile: self.profile.clone(),
                ..S3Settings::new(bucket.clone(), prefix.clone())
            }),
            Location::Local { .. } => None,
        }
    }

    /// Opens the store (no request is sent yet).
    pub async fn open(&self) -> Result<Arc<dyn ObjectStore>> {
        Ok(match &self.location {
            Location::S3 { .. } => {
                let s = self.s3_settings().unwrap_or_default();
                Arc::new(S3Store::connect(&s).await?)
            }
            Location::Local { root, prefix } => Arc::new(LocalStore::new(root, prefix)),
        })
    }

    /// Engine options from this configuration.
    pub fn transfer_options(&self) -> TransferOptions {
        TransferOptions {
            part_size: self.part_size,
            concurrency: self.concurrency,
            state_dir: Some(self.state_dir.clone()),
            ..Default::default()
        }
    }

    /// Opens the store and wraps it in a transfer engine with this configuration's options and
    /// hash cache: what every front end uses to move images and the kernel.
    pub async fn engine(&self, progress: Arc<dyn crate::Progress>) -> Result<crate::Engine> {
        let store = self.open().await?;
        let hashes = Arc::new(crate::HashCache::load(self.hash_cache_path()));
        Ok(crate::Engine::new(
            store,
            self.transfer_options(),
            progress,
            hashes,
        ))
    }

    /// The hash cache file (`<cache>/store/hashes.json`).
    pub fn hash_cache_path(&self) -> PathBuf {
        self.state_dir.join("hashes.json")
    }
}

fn read_file(path: &Path) -> Result<FileConfig> {
    match std::fs::read_to_string(path) {
        Ok(text) => toml::from_str(&text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            reason: e.to_string().replace('\n', " "),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(FileConfig::default()),
        Err(e) => Err(Error::io("read", path, e)),
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

    #[test]
    fn locations() {
        assert_eq!(
            Location::parse("s3://llm-infra-operator-rootfs/dev").unwrap(),
            Location::S3 {
                bucket: "llm-infra-operator-rootfs".into(),
                prefix: "dev/".into()
            }
        );
        assert_eq!(
            Location::parse("runner-codes").unwrap(),
            Location::S3 {
                bucket: "runner-codes".into(),
                prefix: "".into()
            }
        );
        assert!(matches!(
            Location::parse("/srv/store").unwrap(),
            Location::Local { .. }
        ));
        assert!(matches!(
            Location::parse("file:///x").unwrap(),
            Location::Local { .. }
        ));
        assert!(Location::parse("s3://A_B").is_err());
        assert!(Location::parse("http://x").is_err());
        assert!(Location::parse("s3://ab").is_err());
    }

    #[test]
    fn precedence() {
        let d = tempfile::tempdir().unwrap();
        let paths = Paths::under(d.path());
        // Nothing configured: the local store under home.
        let c = StoreConfig::resolve(&StoreFlags::default(), env(&[]), &paths).unwrap();
        assert_eq!(c.origin, Origin::Default);
        assert_eq!(
            c.location,
            Location::Local {
                root: d.path().join("store"),
                prefix: "".into()
            }
        );
        // Config file < S3_BUCKET < BUCKET < flag.
        std::fs::write(
            d.path().join("config.toml"),
            "[store]\nbucket = \"s3://from-file/prod\"\nregion = \"eu-west-1\"\nendpoint_url = \"http://f\"\n",
        )
        .unwrap();
        let c = StoreConfig::resolve(&StoreFlags::default(), env(&[]), &paths).unwrap();
        assert!(matches!(c.origin, Origin::File(_)));
        assert_eq!(c.location.display(), "s3://from-file/prod/");
        assert_eq!(c.region.as_deref(), Some("eu-west-1"));
        let e = env(&[
            ("S3_BUCKET", "from-s3-bucket"),
            ("AWS_REGION", "garage"),
            ("AWS_ENDPOINT_URL", "http://a"),
            ("S3_ENDPOINT_URL", "http://s"),
        ]);
        let c = StoreConfig::resolve(&StoreFlags::default(), e, &paths).unwrap();
        assert_eq!(c.origin, Origin::Env("S3_BUCKET"));
        assert_eq!(c.region.as_deref(), Some("garage"));
        assert_eq!(c.endpoint_url.as_deref(), Some("http://s"));
        let e = env(&[("S3_BUCKET", "from-s3-bucket"), ("BUCKET", "from-bucket")]);
        let c = StoreConfig::resolve(&StoreFlags::default(), e, &paths).unwrap();
        assert_eq!(c.location.display(), "s3://from-bucket/");
        let flags = StoreFlags {
            bucket: Some("s3://flag-bucket/staging/".into()),
            region: Some("us-west-2".into()),
            ..Default::default()
        };
        let c = StoreConfig::resolve(&flags, env(&[("BUCKET", "x-y-z")]), &paths).unwrap();
        assert_eq!(c.location.display(), "s3://flag-bucket/staging/");
        assert_eq!(c.region.as_deref(), Some("us-west-2"));
        // A broken config file is one clear error.
        std::fs::write(d.path().join("config.toml"), "[store]\nbucket = 3\n").unwrap();
        assert!(matches!(
            StoreConfig::resolve(&StoreFlags::default(), env(&[]), &paths),
            Err(Error::Config { .. })
        ));
    }
}
