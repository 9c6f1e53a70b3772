//! Progress reporting as an interface: the library reports, the CLI draws (indicatif) and the
//! API could stream events. Libraries never print.

/// Receives progress from long operations.
pub trait Progress: Send + Sync {
    /// A numbered step started (`[index/total] message`).
    fn step(&self, index: usize, total: usize, message: &str);
    /// A byte transfer started; `total` when known.
    fn transfer_start(&self, id: &str, label: &str, total: Option<u64>);
    /// `bytes` more were transferred.
    fn transfer_inc(&self, id: &str, bytes: u64);
    /// The transfer finished.
    fn transfer_done(&self, id: &str);
    /// A detail line worth showing (e.g. the chosen size).
    fn detail(&self, message: &str);
}

/// Discards progress (tests, `--json`).
pub struct NoProgress;

impl Progress for NoProgress {
    fn step(&self, _: usize, _: usize, _: &str) {}
    fn transfer_start(&self, _: &str, _: &str, _: Option<u64>) {}
    fn transfer_inc(&self, _: &str, _: u64) {}
    fn transfer_done(&self, _: &str) {}
    fn detail(&self, _: &str) {}
}
