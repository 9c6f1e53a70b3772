//! Progress as an interface: the library reports, the CLI draws bars (or stays quiet when not a
//! terminal), the API could stream events. The library never prints.

/// Receives progress of transfers.
pub trait Progress: Send + Sync {
    /// A transfer (or a hashing pass) started; `total` bytes when known.
    fn start(&self, id: &str, label: &str, total: Option<u64>);
    /// `bytes` more were done.
    fn advance(&self, id: &str, bytes: u64);
    /// It finished (successfully or not).
    fn finish(&self, id: &str);
    /// A line worth showing (`resuming upload: 12 of 130 parts already in the store`).
    fn note(&self, message: &str);
}

/// Discards progress (tests, `--json`).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _: &str, _: &str, _: Option<u64>) {}
    fn advance(&self, _: &str, _: u64) {}
    fn finish(&self, _: &str) {}
    fn note(&self, _: &str) {}
}
