//! The infra.operator HTTP API (`infra.operator api`): a thin axum shell over the core crates.
//!
//! ```text
//! request ─▶ metrics (route template, status, latency, bytes) ─▶ auth (bearer key) ─▶ body limit
//!         ─▶ route ─▶ core call: infra_runner (prepare::vm_files, Runner::run),
//!                                 infra_files (Files, Uploads), infra_store (images)
//!         ─▶ ApiError ─▶ one kind → status mapping, OpenAI's error body
//! ```
//!
//! Executions take a slot (at most `runs.max_concurrent` VMs) or wait in a bounded queue; a
//! full queue answers 429 with `Retry-After`. SIGTERM stops accepting connections and new
//! executions, lets in-flight requests finish within `server.shutdown_grace`, then stops.

pub mod config;
pub mod error;
pub mod keys;
pub mod metrics;
pub mod openapi;
mod routes;
mod slots;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use infra_config::Paths;
use infra_runner::prepare::FileOverrides;
use infra_runner::Runner;
use tokio::sync::watch;

pub use config::ApiConfig;
pub use error::{ApiError, ApiResult};
pub use keys::{ApiKey, KeyStore};

/// Shared by every request.
pub struct AppState {
    /// The configuration.
    pub config: ApiConfig,
    /// Host directories.
    pub paths: Paths,
    /// Boots VMs.
    pub runner: Runner,
    /// Kernel or image overrides from the command line.
    pub overrides: FileOverrides,
    /// Files and Uploads.
    pub files: infra_files::Files,
    /// API keys.
    pub keys: KeyStore,
    /// Whether requests need a key.
    pub auth_required: bool,
    /// Prometheus metrics.
    pub metrics: metrics::Metrics,
    /// Execution slots and queue.
    pub slots: slots::Slots,
    /// The warm pool.
    pub pool: infra_runner::pool::Pool,
    /// Flips to true when the server is stopping.
    pub stopping: watch::Receiver<bool>,
    /// When the server started.
    pub started: Instant,
}

/// What `serve` needs from the front end.
pub struct ServerParts {
    /// The configuration.
    pub config: ApiConfig,
    /// Host directories.
    pub paths: Paths,
    /// The runner built from the VM flags.
    pub runner: Runner,
    /// Kernel or image overrides.
    pub overrides: FileOverrides,
}

/// A bound, ready server.
pub struct Server {
    state: Arc<AppState>,
    listener: tokio::net::TcpListener,
    stop_tx: watch::Sender<bool>,
}

impl Server {
    /// Opens the Files store and database, checks the key rule, and binds the listener.
    pub async fn bind(parts: ServerParts) -> Result<Self, ApiError> {
        let keys = KeyStore::new(&parts.paths.home);
        let auth_required = parts.config.auth_required();
        if auth_required && keys.active()? == 0 {
            return Err(ApiError::bad(
                "host",
                format!(
                    "binding {} requires API keys and there are none in {}; create one with `infra.operator api keys create --name NAME`",
                    parts.config.server.host,
                    keys.path().display()
                ),
            ));
        }
        let files_cfg = parts.config.files_config(&parts.paths)?;
        let files = infra_files::Files::open(&files_cfg, &parts.paths).await?;
        let addr = SocketAddr::new(parts.config.server.host, parts.config.server.port);
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| ApiError::Internal {
                what: "cannot bind the listen address (in use? use --port)",
                source,
            })?;
        let (stop_tx, stopping) = watch::channel(false);
        let limits = &parts.config.runs;
        let slots = slots::Slots::new(limits.max_concurrent, limits.max_queue);
        let pool = infra_runner::pool::Pool::new(
            parts.runner.clone(),
            infra_runner::pool::PoolOptions {
                parallel: limits.pool_parallel.max(1),
                reserve_mib: limits.pool_reserve_mib,
            },
        );
        let state = Arc::new(AppState {
            slots,
            config: parts.config,
            paths: parts.paths,
            pool,
            runner: parts.runner,
            overrides: parts.overrides,
            files,
            keys,
            auth_required,
            metrics: metrics::Metrics::default(),
            stopping,
            started: Instant::now(),
        });
        Ok(Self {
            state,
            listener,
            stop_tx,
        })
    }

    /// The bound address (port 0 gives a free one).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Whether keys are required.
    pub fn auth_required(&self) -> bool {
        self.state.auth_required
    }

    /// Serves until `shutdown` resolves, then drains in-flight requests for up to the grace
    /// period and returns.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let grace = Duration::from_secs(self.state.config.server.shutdown_grace);
        let app = router(self.state.clone());
        let stop_tx = self.stop_tx;
        let (signalled_tx, mut signalled_rx) = watch::channel(false);
        let server = axum::serve(self.listener, app).with_graceful_shutdown(async move {
            shutdown.await;
            tracing::info!(
                grace_secs = grace.as_secs(),
                "stopping: no new connections or runs; finishing in-flight requests"
            );
            let _ = stop_tx.send(true);
            let _ = signalled_tx.send(true);
        });
        // The sweeper: expired files, uploads past their hour, orphans (several servers on one
        // bucket and database may all sweep; the files crate makes that safe).
        let interval = self.state.config.server.sweep_interval;
        let sweeper = (interval > 0).then(|| {
            let files = self.state.files.clone();
            let grace = Duration::from_secs(self.state.config.server.sweep_grace);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(interval));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    match files.sweep(grace).await {
                        Ok(r) => tracing::info!(report = ?r, "files swept"),
                        Err(e) => tracing::warn!(error = %e, "files sweep failed; retrying at the next interval"),
                    }
                }
            })
        });
        let pool_setup = tokio::spawn(fill_pool(self.state.clone()));
        let drain_deadline = async move {
            let _ = signalled_rx.wait_for(|s| *s).await;
            tokio::time::sleep(grace).await;
        };
        let out = tokio::select! {
            r = server => r,
            () = drain_deadline => {
                tracing::warn!("shutdown grace period over; stopping with requests still in flight (their VMs are stopped)");
                Ok(())
            }
        };
        if let Some(s) = sweeper {
            s.abort();
        }
        pool_setup.abort();
        self.state.pool.stop().await;
        out
    }
}

/// Gives the warm pool its languages: those of `runs.pool` whose kernel and image are on
/// this host (nothing is fetched or built for the pool).
async fn fill_pool(state: Arc<AppState>) {
    let runs = &state.config.runs;
    for (name, &size) in &runs.pool {
        if size == 0 {
            continue;
        }
        let lang = match infra_runner::prepare::language(name) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(lang = %name, error = %e, "runs.pool names an unknown language; skipped");
                continue;
            }
        };
        let image = state
            .overrides
            .rootfs
            .clone()
            .unwrap_or_else(|| state.paths.image(&lang.key));
        let kernel = state
            .overrides
            .kernel
            .clone()
            .unwrap_or_else(|| state.paths.kernel.clone());
        if !image.exists() || !kernel.exists() {
            tracing::info!(lang = %lang.key, "no pool for this language yet: its image or the kernel is not on this host (the first execution prepares them)");
            continue;
        }
        match infra_runner::prepare::vm_files(
            &state.paths,
            &lang,
            &state.runner.options().agent,
            &state.overrides,
            Arc::new(LogProgress),
        )
        .await
        {
            Ok(f) => state.pool.keep(
                infra_runner::pool::PoolSpec {
                    lang: lang.key.clone(),
                    kernel: f.kernel,
                    initramfs: f.initramfs,
                    rootfs: f.rootfs,
                    mem_mib: runs.mem_mib,
                    vcpus: runs.vcpus,
                    snapshot: f.snapshot,
                },
                size,
            ),
            Err(e) => {
                tracing::warn!(lang = %lang.key, error = %e, "no pool for this language")
            }
        }
    }
}

/// All routes, with the middleware.
pub fn router(state: Arc<AppState>) -> Router {
    routes::routes(state.clone())
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth))
        .layer(axum::middleware::from_fn_with_state(state, observe))
}

/// Routes that answer without a key (load balancers and doc tools call them).
const OPEN_ROUTES: [&str; 2] = ["/health", "/openapi.json"];

async fn auth(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if !state.auth_required || OPEN_ROUTES.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    let token = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let Some(token) = token.filter(|t| !t.is_empty()) else {
        return ApiError::Unauthorized(
            "missing API key: send it as `Authorization: Bearer sk-io-…` (create one with `infra.operator api keys create`)",
        )
        .into_response();
    };
    match state.keys.verify(token) {
        Ok(Some(key)) => {
            tracing::debug!(key = %key.id, "authenticated");
            next.run(req).await
        }
        Ok(None) => ApiError::Unauthorized(
            "incorrect or revoked API key; check the key, or create one with `infra.operator api keys create`",
        )
        .into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// Counts requests, latency and body bytes by route template and status.
async fn observe(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |m| m.as_str().to_string());
    if let Some(n) = content_length(req.headers()) {
        state.metrics.add_bytes("in", n);
    }
    let resp = next.run(req).await;
    if let Some(n) = content_length(resp.headers()) {
        state.metrics.add_bytes("out", n);
    }
    let labels = metrics::RouteLabels {
        method,
        route,
        status: resp.status().as_u16(),
    };
    state.metrics.requests.get_or_create(&labels).inc();
    state
        .metrics
        .latency
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    resp
}

fn content_length(h: &axum::http::HeaderMap) -> Option<u64> {
    h.get(axum::http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Image and store progress, as log lines (a server has no terminal).
pub(crate) struct LogProgress;

impl infra_image::Progress for LogProgress {
    fn step(&self, _: usize, _: usize, message: &str) {
        tracing::info!("{message}");
    }
    fn transfer_start(&self, _: &str, label: &str, total: Option<u64>) {
        tracing::info!(bytes = total, "{label}");
    }
    fn transfer_inc(&self, _: &str, _: u64) {}
    fn transfer_done(&self, _: &str) {}
    fn detail(&self, message: &str) {
        tracing::info!("{message}");
    }
}
