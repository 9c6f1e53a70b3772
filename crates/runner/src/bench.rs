//! `benchmark`: real executions timed on this host, the way a user compares hosts.
//!
//! For one language and program (default `print(42)`-like, from the language table), in one
//! process and one sitting:
//! - **cold**: a fresh VM booted per run: VMM start to agent ready (`boot`), and the whole run
//!   seen from the caller (`total`);
//! - **restore**: the same from a snapshot (the language's own when it fits, else one made for
//!   the benchmark in a temporary directory and removed after);
//! - **pool**: a warm pool of one VM: the hand-out (the caller's wall time for a run on a ready
//!   VM minus the time the program ran in the guest: what the pool path adds), and the refill
//!   (hand-out to a ready VM again);
//! - **exec**: the program's own time in the guest.
//!
//! Each as min / median / p90 over `runs`, with the backend, acceleration and host facts, so
//! a run on a KVM host shows the production numbers this repository's TCG hosts cannot.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::RunError;
use crate::pool::{Pool, PoolOptions, PoolSpec};
use crate::{RunOutcome, RunSpec, Runner, SnapshotRequest};

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// The run's template (language, code, files, memory, vCPUs); `snapshot` is the language's
    /// snapshot when one exists.
    pub spec: RunSpec,
    /// Initramfs carrying this host's agent.
    pub initramfs: PathBuf,
    /// Repetitions per measurement.
    pub runs: usize,
    /// Where a temporary snapshot goes when the language has none that fits.
    pub scratch: PathBuf,
    /// Skip the restore measurements.
    pub no_restore: bool,
    /// Skip the pool measurements.
    pub no_pool: bool,
}

/// min / median / p90 of one measurement, seconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stat {
    /// Samples.
    pub n: usize,
    /// Smallest.
    pub min: f64,
    /// Median.
    pub median: f64,
    /// 90th percentile (nearest rank).
    pub p90: f64,
}

impl Stat {
    /// The statistics of `xs` (`None` when empty).
    pub fn of(xs: &[f64]) -> Option<Stat> {
        if xs.is_empty() {
            return None;
        }
        let mut v = xs.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        let rank = ((0.9 * n as f64).ceil() as usize).clamp(1, n);
        Some(Stat {
            n,
            min: v[0],
            median,
            p90: v[rank - 1],
        })
    }
}

/// The host the numbers come from.
#[derive(Debug, Clone, Serialize)]
pub struct HostFacts {
    /// `model name` of the first CPU.
    pub cpu: String,
    /// CPUs available to this process.
    pub cpus: usize,
    /// `MemTotal`, MiB.
    pub mem_total_mib: u64,
    /// Host kernel release.
    pub kernel: String,
    /// `/dev/kvm` exists.
    pub dev_kvm: bool,
}

impl HostFacts {
    /// Reads `/proc`.
    pub fn read() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let mem_total_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|t| {
                let l = t.lines().find(|l| l.starts_with("MemTotal:"))?.to_string();
                l.split_whitespace().nth(1)?.parse::<u64>().ok()
            })
            .map(|kib| kib / 1024)
            .unwrap_or(0);
        HostFacts {
            cpu,
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            mem_total_mib,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            dev_kvm: Path::new("/dev/kvm").exists(),
        }
    }
}

/// Everything `benchmark` measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Language.
    pub lang: String,
    /// The program.
    pub code: String,
    /// Repetitions per measurement.
    pub runs: usize,
    /// Guest memory, MiB.
    pub mem_mib: u32,
    /// Guest vCPUs.
    pub vcpus: u8,
    /// VMM.
    pub backend: String,
    /// Its version.
    pub backend_version: String,
    /// `kvm` or `tcg`.
    pub accel: String,
    /// This build's version.
    pub version: String,
    /// When (RFC 3339).
    pub date: String,
    /// The host.
    pub host: HostFacts,
    /// Cold boot: VMM start to agent ready.
    pub cold_boot: Option<Stat>,
    /// Cold run, whole, as the caller sees it.
    pub cold_total: Option<Stat>,
    /// Restore: VMM start to agent ready and reseeded.
    pub restore_boot: Option<Stat>,
    /// Run from a snapshot, whole.
    pub restore_total: Option<Stat>,
    /// What a run on a ready pool VM adds to the program's own time.
    pub pool_handout: Option<Stat>,
    /// Hand-out to a ready VM again (pool of one).
    pub pool_refill: Option<Stat>,
    /// The program's time in the guest (all runs).
    pub exec: Option<Stat>,
    /// Where the snapshot came from, and anything skipped, with the reason.
    pub notes: Vec<String>,
}

/// Progress lines while measuring.
pub trait BenchProgress: Send + Sync {
    /// One line (`cold 2/5: 3.1 s`).
    fn line(&self, text: &str);
}

/// Runs the benchmark. Every run must succeed with exit code 0 (a failing program is not a
/// measurement); the first failure stops it.
pub async fn run(
    runner: &Runner,
    opts: &BenchOptions,
    progress: &dyn BenchProgress,
) -> Result<BenchReport, RunError> {
    let runs = opts.runs.max(1);
    let mut notes = Vec::new();
    let mut exec = Vec::new();
    let mut backend = (String::new(), String::new());

    let mut cold_boot = Vec::new();
    let mut cold_total = Vec::new();
    let cold = RunSpec {
        snapshot: None,
        ..opts.spec.clone()
    };
    for i in 1..=runs {
        let (o, wall) = timed_run(runner, &cold, &opts.initramfs, None).await?;
        progress.line(&format!(
            "cold {i}/{runs}: ready in {:.3} s, run {:.3} s",
            o.boot_time, wall
        ));
        backend = (o.backend.clone(), o.accel.clone());
        cold_boot.push(o.boot_time);
        cold_total.push(wall);
        exec.push(o.exec_time);
    }

    // A snapshot: the language's own when it fits, else one made here.
    let mut scratch: Option<tempfile::TempDir> = None;
    let mut snap = None;
    if !opts.no_restore {
        if let Some(dir) = &opts.spec.snapshot {
            let probe = RunSpec {
                snapshot: Some(dir.clone()),
                ..opts.spec.clone()
            };
            let (o, _) = timed_run(runner, &probe, &opts.initramfs, None).await?;
            if o.start == "restore" {
                notes.push(format!("restore: the snapshot in {}", dir.display()));
                snap = Some(dir.clone());
            } else {
                notes.push(format!(
                    "restore: the language's snapshot does not fit ({}); one was made for the benchmark",
                    o.start_note.unwrap_or_default()
                ));
            }
        }
        if snap.is_none() {
            infra_config::ensure_dir(&opts.scratch, 0o700)?;
            let tmp = tempfile::Builder::new()
                .prefix("bench-")
                .tempdir_in(&opts.scratch)
                .map_err(|e| {
                    RunError::Prerequisite(format!(
                        "cannot create a directory in {}: {e}",
                        opts.scratch.display()
                    ))
                })?;
            let dir = tmp.path().join(&opts.spec.lang);
            progress.line("making a snapshot for the restore runs");
            let m = runner
                .create_snapshot(&SnapshotRequest {
                    lang: opts.spec.lang.clone(),
                    kernel: opts.spec.kernel.clone(),
                    initramfs: opts.initramfs.clone(),
                    rootfs: opts.spec.rootfs.clone(),
                    mem_mib: opts.spec.mem_mib,
                    vcpus: opts.spec.vcpus,
                    warmup: None,
                    warmup_timeout: Duration::from_secs(60),
                    dir: dir.clone(),
                })
                .await?;
            if !notes.iter().any(|n| n.starts_with("restore:")) {
                notes.push(format!(
                    "restore: a snapshot made for the benchmark (boot {:.2} s), removed after",
                    m.boot_secs
                ));
            }
            snap = Some(dir);
            scratch = Some(tmp);
        }
    }
    let mut restore_boot = Vec::new();
    let mut restore_total = Vec::new();
    if let Some(dir) = &snap {
        let spec = RunSpec {
            snapshot: Some(dir.clone()),
            ..opts.spec.clone()
        };
        for i in 1..=runs {
            let (o, wall) = timed_run(runner, &spec, &opts.initramfs, None).await?;
            if o.start != "restore" {
                return Err(RunError::Prerequisite(format!(
                    "the benchmark's snapshot was not restored: {}",
                    o.start_note.unwrap_or_default()
                )));
            }
            progress.line(&format!(
                "restore {i}/{runs}: ready in {:.3} s, run {:.3} s",
                o.boot_time, wall
            ));
            restore_boot.push(o.boot_time);
            restore_total.push(wall);
            exec.push(o.exec_time);
        }
    }

    let mut handout = Vec::new();
    let mut refill = Vec::new();
    if !opts.no_pool {
        let pool = Pool::new(
            runner.clone(),
            PoolOptions {
                parallel: 1,
                reserve_mib: 0,
            },
        );
        pool.keep(
            PoolSpec {
                lang: opts.spec.lang.clone(),
                kernel: opts.spec.kernel.clone(),
                initramfs: opts.initramfs.clone(),
                rootfs: opts.spec.rootfs.clone(),
                mem_mib: opts.spec.mem_mib,
                vcpus: opts.spec.vcpus,
                snapshot: snap.clone(),
            },
            1,
        );
        let measured = pool_runs(
            runner,
            &pool,
            opts,
            runs,
            progress,
            &mut handout,
            &mut refill,
            &mut exec,
        )
        .await;
        pool.stop().await;
        measured?;
        notes.push(format!(
            "pool: one VM, filled {}",
            if snap.is_some() {
                "from the snapshot"
            } else {
                "by cold boots"
            }
        ));
    }
    drop(scratch);

    let probe = runner.backend_version(&backend.0);
    Ok(BenchReport {
        lang: opts.spec.lang.clone(),
        code: opts.spec.code.clone(),
        runs,
        mem_mib: opts.spec.mem_mib,
        vcpus: opts.spec.vcpus,
        backend: backend.0,
        backend_version: probe,
        accel: backend.1,
        version: env!("CARGO_PKG_VERSION").to_string(),
        date: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        host: HostFacts::read(),
        cold_boot: Stat::of(&cold_boot),
        cold_total: Stat::of(&cold_total),
        restore_boot: Stat::of(&restore_boot),
        restore_total: Stat::of(&restore_total),
        pool_handout: Stat::of(&handout),
        pool_refill: Stat::of(&refill),
        exec: Stat::of(&exec),
        notes,
    })
}

#[allow(clippy::too_many_arguments)]
async fn pool_runs(
    runner: &Runner,
    pool: &Pool,
    opts: &BenchOptions,
    runs: usize,
    progress: &dyn BenchProgress,
    handout: &mut Vec<f64>,
    refill: &mut Vec<f64>,
    exec: &mut Vec<f64>,
) -> Result<(), RunError> {
    let spec = opts.spec.clone();
    let deadline = runner.options().boot_timeout * 2;
    let no_vm = |pool: &Pool| {
        let failures = pool.stats().first().map(|s| s.failures).unwrap_or(0);
        RunError::Prerequisite(format!(
            "the pool had no ready VM after {} s ({failures} start failures); run with RUST_LOG=debug",
            deadline.as_secs()
        ))
    };
    let ready = |pool: &Pool| pool.stats().first().is_some_and(|s| s.ready > 0);
    let waited = Instant::now();
    while !ready(pool) {
        if waited.elapsed() > deadline {
            return Err(no_vm(pool));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for i in 1..=runs {
        let vm = pool
            .take(&spec, &opts.initramfs)
            .ok_or_else(|| no_vm(pool))?;
        let taken = Instant::now();
        let (o, wall) = timed_run(runner, &spec, &opts.initramfs, Some(vm)).await?;
        progress.line(&format!(
            "pool {i}/{runs}: run {:.3} s, of which the program {:.3} s",
            wall, o.exec_time
        ));
        handout.push((wall - o.exec_time).max(0.0));
        exec.push(o.exec_time);
        // The refill runs behind the hand-out; wait for it (polled every 5 ms) before the
        // next hand-out, so each run finds a ready VM and each refill is timed whole.
        while !ready(pool) {
            if taken.elapsed() > deadline {
                return Err(no_vm(pool));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        refill.push(taken.elapsed().as_secs_f64());
    }
    Ok(())
}

/// One run, timed from the caller's side; a run that does not exit 0 stops the benchmark.
async fn timed_run(
    runner: &Runner,
    spec: &RunSpec,
    initramfs: &Path,
    pooled: Option<crate::ReadyVm>,
) -> Result<(RunOutcome, f64), RunError> {
    let t = Instant::now();
    let o = runner.run_on(spec, initramfs, pooled, |_| {}).await?;
    let wall = t.elapsed().as_secs_f64();
    if o.exit_code != 0 || o.timed_out {
        return Err(RunError::Usage(format!(
            "the benchmark's program failed (exit {}{}): {}",
            o.exit_code,
            if o.timed_out { ", timed out" } else { "" },
            o.stderr.lines().last().unwrap_or("")
        )));
    }
    Ok((o, wall))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_are_nearest_rank() {
        assert_eq!(Stat::of(&[]), None);
        let s = Stat::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.n, s.min, s.median, s.p90), (3, 1.0, 2.0, 3.0));
        let xs: Vec<f64> = (1..=10).map(f64::from).collect();
        let s = Stat::of(&xs).unwrap();
        assert_eq!((s.min, s.median, s.p90), (1.0, 5.5, 9.0));
        let s = Stat::of(&[7.0]).unwrap();
        assert_eq!((s.min, s.median, s.p90), (7.0, 7.0, 7.0));
    }
}
