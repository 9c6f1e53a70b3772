//! `api`: serve the HTTP API; `api keys create|list|revoke`: manage its API keys.

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use infra_api::{ApiConfig, KeyStore, Server, ServerParts};
use infra_config::Paths;

use crate::run::VmArgs;

/// `api` flags.
#[derive(Args, Debug)]
#[command(
    args_conflicts_with_subcommands = true,
    after_help = "Examples:
  infra.operator api                                   # 127.0.0.1:8080, no key needed
  infra.operator api keys create --name ci             # prints the key once
  infra.operator api --host 0.0.0.0 -p 8080 --config /etc/infra-operator/api.yaml
  curl -s localhost:8080/api/v1/execute -H 'content-type: application/json' \\
       -d '{\"language\":\"python\",\"code\":\"print(6*7)\"}'

Binding a non-loopback address requires API keys (Authorization: Bearer sk-io-...).
SIGTERM or Ctrl-C stops accepting work and lets in-flight runs finish (server.shutdown_grace)."
)]
pub struct ApiArgs {
    /// Manage API keys.
    #[command(subcommand)]
    command: Option<ApiCommand>,
    /// Address to bind [default: 127.0.0.1, or the config file's server.host].
    #[arg(long)]
    host: Option<IpAddr>,
    /// Port to bind [default: 8080, or the config file's server.port].
    #[arg(short, long)]
    port: Option<u16>,
    /// YAML config: server and run limits, the Files provider (see the README).
    #[arg(long, env = "INFRA_API_CONFIG")]
    config: Option<PathBuf>,
    /// Require API keys on loopback too.
    #[arg(long)]
    require_auth: bool,
    #[command(flatten)]
    vm: VmArgs,
}

#[derive(Subcommand, Debug)]
enum ApiCommand {
    /// API keys (stored hashed in <home>/api-keys.json).
    #[command(subcommand)]
    Keys(KeysCommand),
}

#[derive(Subcommand, Debug)]
enum KeysCommand {
    /// Create a key and print it (it is shown only once).
    #[command(after_help = "Example:\n  infra.operator api keys create --name ci")]
    Create {
        /// A label for the key.
        #[arg(long)]
        name: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// List keys (never the secrets).
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key by id (key_...) or prefix; servers stop accepting it at once.
    #[command(after_help = "Example:\n  infra.operator api keys revoke key_3f9a0c1d2e4b5a6c")]
    Revoke {
        /// Key id or prefix.
        id: String,
    },
}

/// Runs `api`.
pub async fn run(a: ApiArgs, paths: &Paths) -> Result<()> {
    if let Some(ApiCommand::Keys(k)) = a.command {
        return keys(k, paths);
    }
    let mut config = match &a.config {
        Some(p) => ApiConfig::load(p)?,
        None => ApiConfig::default(),
    };
    if let Some(h) = a.host {
        config.server.host = h;
    }
    if let Some(p) = a.port {
        config.server.port = p;
    }
    config.server.require_auth |= a.require_auth;
    let runner = a.vm.runner(paths)?;
    let parts = ServerParts {
        config,
        paths: paths.clone(),
        runner,
        overrides: a.vm.overrides(),
    };
    let server = Server::bind(parts).await?;
    let addr = server
        .local_addr()
        .context("cannot read the bound address")?;
    eprintln!(
        "infra.operator API listening on http://{addr} ({}); OpenAPI at /openapi.json",
        if server.auth_required() {
            "API key required"
        } else {
            "loopback, no key required"
        }
    );
    server
        .serve(async {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(t) => t,
                    Err(_) => {
                        let _ = tokio::signal::ctrl_c().await;
                        return;
                    }
                };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        })
        .await
        .context("the HTTP server failed")?;
    eprintln!("infra.operator API stopped");
    Ok(())
}

fn keys(k: KeysCommand, paths: &Paths) -> Result<()> {
    infra_config::ensure_dir(&paths.home, infra_config::SHARED_READ_DIR)?;
    let store = KeyStore::new(&paths.home);
    match k {
        KeysCommand::Create { name, json } => {
            let (key, token) = store.create(&name)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"id": key.id, "name": key.name, "key": token, "created_at": key.created_at})
                );
            } else {
                println!(
                    "Created API key {} ({}). It is shown only this once:",
                    key.id, key.name
                );
                println!("{token}");
            }
        }
        KeysCommand::List { json } => {
            let all = store.list()?;
            if json {
                println!("{}", serde_json::to_string(&all)?);
                return Ok(());
            }
            if all.is_empty() {
                println!(
                    "No API keys; create one with `infra.operator api keys create --name NAME`"
                );
                return Ok(());
            }
            let rows = all
                .iter()
                .map(|k| {
                    vec![
                        k.id.clone(),
                        k.name.clone(),
                        format!("{}…", k.prefix),
                        fmt_time(k.created_at),
                        k.revoked_at.map_or_else(
                            || "active".into(),
                            |t| format!("revoked {}", fmt_time(t)),
                        ),
                    ]
                })
                .collect();
            println!(
                "{}",
                crate::ui::table(&["ID", "NAME", "PREFIX", "CREATED", "STATUS"], rows)
            );
        }
        KeysCommand::Revoke { id } => {
            let k = store.revoke(&id)?;
            println!("Revoked {} ({})", k.id, k.name);
        }
    }
    Ok(())
}

fn fmt_time(t: i64) -> String {
    chrono::DateTime::from_timestamp(t, 0)
        .map(|d| {
            d.with_timezone(&chrono::Local)
                .format("%Y-%m-%d %H:%M")
                .to_string()
        })
        .unwrap_or_default()
}
