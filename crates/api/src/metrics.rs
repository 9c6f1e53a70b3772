//! `GET /metrics`: Prometheus text from `prometheus-client`. Requests and latency by route
//! template and status, runs by status, VMs live, queue depth, bytes in and out.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels of a request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// Method.
    pub method: String,
    /// Route template (`/v1/files/{file_id}`), never the raw path (ids would explode the
    /// series count).
    pub route: String,
    /// Status code.
    pub status: u16,
}

/// Labels of a run.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RunLabels {
    /// Language key.
    pub language: String,
    /// `success`, `error`, `timeout`, `compile_error`, `sandbox_failure`, ...
    pub status: String,
}

/// Labels of a byte counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirLabels {
    /// `in` (request bodies) or `out` (response bodies).
    pub direction: String,
}

/// Every metric the server keeps.
pub struct Metrics {
    registry: Registry,
    /// Requests by route and status.
    pub requests: Family<RouteLabels, Counter>,
    /// Latency to the response head by route and status, seconds.
    pub latency: Family<RouteLabels, Histogram>,
    /// Finished runs by language and status.
    pub runs: Family<RunLabels, Counter>,
    /// Run durations (boot + exec), seconds.
    pub run_seconds: Histogram,
    /// VMs running now.
    pub vms_live: Gauge<i64, std::sync::atomic::AtomicI64>,
    /// Warm VMs ready in the pool (0 until a pool exists).
    pub vms_pooled: Gauge<i64, std::sync::atomic::AtomicI64>,
    /// Executions waiting for a slot.
    pub queue_depth: Gauge<i64, std::sync::atomic::AtomicI64>,
    /// Bytes of request and response bodies.
    pub bytes: Family<DirLabels, Counter<u64, AtomicU64>>,
    /// Executions refused with 429.
    pub rejected: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("infra_operator");
        let requests = Family::<RouteLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by route and status",
            requests.clone(),
        );
        let latency = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 20))
        });
        registry.register(
            "http_request_duration_seconds",
            "Time to the response head by route and status",
            latency.clone(),
        );
        let runs = Family::<RunLabels, Counter>::default();
        registry.register(
            "runs",
            "Finished executions by language and status",
            runs.clone(),
        );
        let run_seconds = Histogram::new(exponential_buckets(0.05, 2.0, 14));
        registry.register(
            "run_duration_seconds",
            "Whole executions (boot and program), seconds",
            run_seconds.clone(),
        );
        let vms_live = Gauge::default();
        registry.register("vms_live", "MicroVMs running now", vms_live.clone());
        let vms_pooled = Gauge::default();
        registry.register(
            "vms_pooled",
            "Warm microVMs ready in the pool",
            vms_pooled.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register(
            "queue_depth",
            "Executions waiting for a slot",
            queue_depth.clone(),
        );
        let bytes = Family::<DirLabels, Counter<u64, AtomicU64>>::default();
        registry.register("http_body_bytes", "Body bytes in and out", bytes.clone());
        let rejected = Counter::default();
        registry.register(
            "runs_rejected",
            "Executions refused with 429 (queue full)",
            rejected.clone(),
        );
        Self {
            registry,
            requests,
            latency,
            runs,
            run_seconds,
            vms_live,
            vms_pooled,
            queue_depth,
            bytes,
            rejected,
        }
    }
}

impl Metrics {
    /// The exposition text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// Counts body bytes.
    pub fn add_bytes(&self, direction: &str, n: u64) {
        self.bytes
            .get_or_create(&DirLabels {
                direction: direction.into(),
            })
            .inc_by(n);
    }
}
