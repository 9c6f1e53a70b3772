//! The server's configuration file (`--config`, YAML): server limits, execution limits and the
//! Files provider (seed 004's `files:` provider entry, as `infra_files::FilesConfig` reads it).
//!
//! ```yaml
//! server:
//!   host: 127.0.0.1
//!   port: 8080
//!   require_auth: false        # always on when host is not loopback
//!   max_json_body: 16777216    # bytes of a JSON request
//!   request_timeout: 60        # seconds, for routes without a body stream or a run
//!   shutdown_grace: 30         # seconds SIGTERM waits for in-flight runs and uploads
//!   sweep_interval: 600        # seconds between sweeps of expired files and orphans (0: off)
//!   sweep_grace: 3600          # an orphan must be this old before the sweeper removes it
//! runs:
//!   max_concurrent: 2          # VMs at once
//!   max_queue: 32              # executions waiting for a slot; more get 429
//!   default_timeout: 30
//!   max_timeout: 300
//!   mem_mib: 512
//!   vcpus: 1
//!   max_output_bytes: 1048576  # per stream
//!   max_output_files: 32
//!   max_output_file_bytes: 67108864
//!   max_output_total_bytes: 268435456
//!   max_input_bytes: 268435456 # file_ids and files together
//!   pool: {python: 1}          # ready VMs per language (from its snapshot when one fits)
//!   pool_parallel: 1           # pool VMs started at once
//!   pool_reserve_mib: 512      # host memory left free; below it the pool shrinks
//! files:                       # optional; default: local directory + SQLite under the home
//!   provider_type: remote::s3
//!   config: { bucket_name: my-files, metadata_store: { type: sqlite, db_path: /var/lib/x/files.db } }
//! ```

use std::net::IpAddr;
use std::path::Path;

use serde::Deserialize;

use crate::error::ApiError;

/// The whole file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Listener and HTTP limits.
    #[serde(default)]
    pub server: ServerConfig,
    /// Execution limits.
    #[serde(default)]
    pub runs: RunLimits,
    /// The Files provider entry; `None`: embedded (local directory and SQLite).
    #[serde(default)]
    pub files: Option<serde_yaml_ng::Value>,
}

/// `server:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to bind.
    pub host: IpAddr,
    /// Port to bind.
    pub port: u16,
    /// Require an API key even on loopback.
    pub require_auth: bool,
    /// Largest JSON request body, bytes.
    pub max_json_body: usize,
    /// Seconds a request without a streamed body or a run may take.
    pub request_timeout: u64,
    /// Seconds SIGTERM waits for in-flight work before the server stops anyway.
    pub shutdown_grace: u64,
    /// Seconds between sweeps of expired files, stale uploads and orphans (0: never).
    pub sweep_interval: u64,
    /// Seconds an object without a row (or a row without an object) must be old before the
    /// sweeper removes it (a create in flight is younger).
    pub sweep_grace: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            host: IpAddr::from([127, 0, 0, 1]),
            port: 8080,
            require_auth: false,
            max_json_body: 16 << 20,
            request_timeout: 60,
            shutdown_grace: 30,
            sweep_interval: 600,
            sweep_grace: 3600,
        }
    }
}

/// `runs:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunLimits {
    /// VMs running at once.
    pub max_concurrent: usize,
    /// Executions waiting for a slot; beyond that, 429.
    pub max_queue: usize,
    /// Timeout when the request gives none, seconds.
    pub default_timeout: u64,
    /// Largest timeout a request may ask for, seconds.
    pub max_timeout: u64,
    /// Guest memory, MiB.
    pub mem_mib: u32,
    /// Guest vCPUs.
    pub vcpus: u8,
    /// Cap on each of stdout and stderr, bytes.
    pub max_output_bytes: u64,
    /// Most output files returned per run.
    pub max_output_files: usize,
    /// Largest output file returned.
    pub max_output_file_bytes: u64,
    /// Output files' total.
    pub max_output_total_bytes: u64,
    /// Input files (`file_ids` and `files`) total.
    pub max_input_bytes: u64,
    /// Warm pool: ready VMs kept per language (restored from the language's snapshot when
    /// one fits, else booted), each used for one execution. Languages whose image or kernel
    /// is not on this host yet are skipped (logged), never built at startup.
    pub pool: std::collections::BTreeMap<String, usize>,
    /// Pool VMs started at once.
    pub pool_parallel: usize,
    /// MiB of host memory the pool leaves free beyond a new VM's own; below it the pool
    /// gives VMs back instead of refilling.
    pub pool_reserve_mib: u64,
}

impl Default for RunLimits {
    fn default() -> Self {
        Self {
            max_concurrent: 2,
            max_queue: 32,
            default_timeout: 30,
            max_timeout: 300,
            mem_mib: 512,
            vcpus: 1,
            max_output_bytes: 1 << 20,
            max_output_files: 32,
            max_output_file_bytes: 64 << 20,
            max_output_total_bytes: 256 << 20,
            max_input_bytes: 256 << 20,
            pool: [("python".to_string(), 1)].into(),
            pool_parallel: 1,
            pool_reserve_mib: 512,
        }
    }
}

impl ApiConfig {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Self, ApiError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ApiError::bad(
                "config",
                format!("cannot read the config file {}: {e}", path.display()),
            )
        })?;
        Self::parse(&text).map_err(|e| ApiError::bad("config", format!("{}: {e}", path.display())))
    }

    /// Parses and checks YAML text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let cfg: Self = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The Files provider config (embedded when there is no `files:` entry).
    pub fn files_config(
        &self,
        paths: &infra_config::Paths,
    ) -> Result<infra_files::FilesConfig, ApiError> {
        match &self.files {
            None => Ok(infra_files::FilesConfig::embedded(paths)),
            Some(v) => {
                let text = serde_yaml_ng::to_string(v).map_err(|e| {
                    ApiError::bad("config", format!("files: cannot be re-read: {e}"))
                })?;
                Ok(infra_files::FilesConfig::from_yaml(&text)?)
            }
        }
    }

    fn validate(&self) -> Result<(), String> {
        let r = &self.runs;
        if r.max_concurrent == 0 {
            return Err("runs.max_concurrent must be at least 1".into());
        }
        if r.default_timeout == 0 || r.default_timeout > r.max_timeout {
            return Err("runs.default_timeout must be between 1 and runs.max_timeout".into());
        }
        if r.max_timeout * 1000 > infra_protocol_max_timeout_ms() {
            return Err("runs.max_timeout is over 24 h".into());
        }
        if self.server.max_json_body < 1024 {
            return Err("server.max_json_body must be at least 1024 bytes".into());
        }
        Ok(())
    }

    /// Whether requests need an API key.
    pub fn auth_required(&self) -> bool {
        self.server.require_auth || !self.server.host.is_loopback()
    }
}

fn infra_protocol_max_timeout_ms() -> u64 {
    24 * 3600 * 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_auth_rule() {
        let c = ApiConfig::parse("{}").unwrap();
        assert_eq!(c.server.port, 8080);
        assert!(!c.auth_required(), "loopback needs no key by default");
        let c = ApiConfig::parse("server: {host: 0.0.0.0}").unwrap();
        assert!(c.auth_required(), "a public bind always needs keys");
        let c = ApiConfig::parse("server: {host: '::1', require_auth: true}").unwrap();
        assert!(c.auth_required());
    }

    #[test]
    fn refuses_unknown_keys_and_bad_limits() {
        assert!(ApiConfig::parse("server: {prot: 1}").is_err());
        assert!(ApiConfig::parse("runs: {max_concurrent: 0}").is_err());
        assert!(ApiConfig::parse("runs: {default_timeout: 400}").is_err());
    }
}
