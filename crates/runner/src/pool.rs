//! A warm pool: VMs made ready ahead of requests, per language, each handed out for exactly
//! one run and destroyed after it (no state passes from one execution to the next).
//!
//! Pool VMs are restored from the language's snapshot when it fits (else booted), greeted and,
//! when restored, reseeded, exactly as a run's own VM would be. A background task per pool
//! keeps `size` of them ready, starting at most `parallel` at once across all languages. It
//! refills only while the host has the memory for another VM (`MemAvailable` at least the
//! guest's memory plus [`PoolOptions::reserve_mib`]) and gives ready VMs back when it drops
//! below the reserve, so memory pressure shrinks the pool instead of failing executions. A VM
//! that fails to become ready is counted and replaced after a pause; a pooled VM that died is
//! discarded at hand-out, never given to a run.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::{ReadyVm, RunSpec, Runner};

/// Pool-wide settings.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// VMs started at once, across all languages.
    pub parallel: usize,
    /// MiB of host memory kept free beyond a new VM's own.
    pub reserve_mib: u64,
}

impl Default for PoolOptions {
    fn default() -> Self {
        Self {
            parallel: 1,
            reserve_mib: 512,
        }
    }
}

/// What the pool of one language makes: the files and shape of its VMs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSpec {
    /// Language key.
    pub lang: String,
    /// Kernel.
    pub kernel: PathBuf,
    /// Initramfs.
    pub initramfs: PathBuf,
    /// Image.
    pub rootfs: PathBuf,
    /// Guest memory.
    pub mem_mib: u32,
    /// vCPUs.
    pub vcpus: u8,
    /// Snapshot to restore from when it fits.
    pub snapshot: Option<PathBuf>,
}

impl PoolSpec {
    /// Whether a VM of this pool can serve `spec` (same language, files and shape).
    pub fn serves(&self, spec: &RunSpec, initramfs: &std::path::Path) -> bool {
        self.lang == spec.lang
            && self.kernel == spec.kernel
            && self.initramfs == initramfs
            && self.rootfs == spec.rootfs
            && self.mem_mib == spec.mem_mib
            && self.vcpus == spec.vcpus
    }
}

/// Counts for metrics and `/health`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PoolStats {
    /// Language key.
    pub lang: String,
    /// Target size.
    pub size: usize,
    /// VMs ready now.
    pub ready: usize,
    /// VMs being started.
    pub starting: usize,
    /// VMs handed out.
    pub handed_out: u64,
    /// VMs that failed to become ready.
    pub failures: u64,
    /// VMs given back because host memory ran low.
    pub shrunk: u64,
    /// Seconds the last refill took (VMM start to ready agent).
    pub last_ready_secs: f64,
    /// How the last one started: `restore` or `boot`.
    pub last_start: String,
}

struct Pooled {
    vm: ReadyVm,
}

struct Entry {
    spec: PoolSpec,
    ready: VecDeque<Pooled>,
    stats: PoolStats,
}

struct Inner {
    runner: Runner,
    opts: PoolOptions,
    entries: Mutex<HashMap<String, Entry>>,
    starting: tokio::sync::Semaphore,
    wake: tokio::sync::Notify,
    stop: tokio::sync::watch::Sender<bool>,
}

/// The warm pool (cheap to clone; one background task per pool).
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("stats", &self.stats())
            .finish()
    }
}

/// Host memory available now, MiB (`MemAvailable`).
pub fn mem_available_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

impl Pool {
    /// An empty pool; [`Pool::keep`] gives it languages. Its task runs until [`Pool::stop`].
    pub fn new(runner: Runner, opts: PoolOptions) -> Self {
        let (stop, _) = tokio::sync::watch::channel(false);
        let pool = Pool {
            inner: Arc::new(Inner {
                runner,
                starting: tokio::sync::Semaphore::new(opts.parallel.max(1)),
                opts,
                entries: Mutex::new(HashMap::new()),
                wake: tokio::sync::Notify::new(),
                stop,
            }),
        };
        let p = pool.clone();
        tokio::spawn(async move { p.refill_loop().await });
        pool
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.inner.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps `size` ready VMs of `spec` (replacing the language's previous spec; VMs of an
    /// old spec are stopped).
    pub fn keep(&self, spec: PoolSpec, size: usize) {
        let old = {
            let mut map = self.entries();
            let e = map.entry(spec.lang.clone()).or_insert_with(|| Entry {
                spec: spec.clone(),
                ready: VecDeque::new(),
                stats: PoolStats {
                    lang: spec.lang.clone(),
                    ..Default::default()
                },
            });
            e.stats.size = size;
            if e.spec != spec {
                e.spec = spec;
                std::mem::take(&mut e.ready)
            } else {
                VecDeque::new()
            }
        };
        stop_all(old);
        self.inner.wake.notify_one();
    }

    /// A ready VM for `spec`, if the pool has one that serves it; the pool refills behind.
    pub fn take(&self, spec: &RunSpec, initramfs: &std::path::Path) -> Option<ReadyVm> {
        let mut dead = VecDeque::new();
        let got = {
            let mut map = self.entries();
            let e = map.get_mut(&spec.lang)?;
            if !e.spec.serves(spec, initramfs) {
                return None;
            }
            let mut got = None;
            while let Some(mut p) = e.ready.pop_front() {
                if let Some(why) = p.vm.vm.exited() {
                    tracing::warn!(lang = %spec.lang, why, "a pooled VM died; discarded");
                    e.stats.failures += 1;
                    dead.push_back(p);
                    continue;
                }
                e.stats.handed_out += 1;
                got = Some(p.vm);
                break;
            }
            e.stats.ready = e.ready.len();
            got
        };
        stop_all(dead);
        self.inner.wake.notify_one();
        got
    }

    /// Counts per language.
    pub fn stats(&self) -> Vec<PoolStats> {
        let map = self.entries();
        let mut v: Vec<PoolStats> = map
            .values()
            .map(|e| PoolStats {
                ready: e.ready.len(),
                ..e.stats.clone()
            })
            .collect();
        v.sort_by(|a, b| a.lang.cmp(&b.lang));
        v
    }

    /// VMs ready now, all languages.
    pub fn ready_total(&self) -> usize {
        self.entries().values().map(|e| e.ready.len()).sum()
    }

    /// Stops the refill task and every pooled VM (waiting for them).
    pub async fn stop(&self) {
        let _ = self.inner.stop.send(true);
        self.inner.wake.notify_one();
        // VMs being started finish (or fail) first: wait for their permits.
        let n = self.inner.opts.parallel.max(1) as u32;
        let _all = self.inner.starting.acquire_many(n).await;
        let vms: Vec<Pooled> = {
            let mut map = self.entries();
            map.values_mut()
                .flat_map(|e| std::mem::take(&mut e.ready))
                .collect()
        };
        for p in vms {
            let _ = p.vm.vm.stop().await;
        }
    }

    /// One pass: what to start, what to give back.
    fn plan(&self) -> (Vec<PoolSpec>, Vec<Pooled>) {
        let avail = mem_available_mib();
        let reserve = self.inner.opts.reserve_mib;
        let mut map = self.entries();
        let mut start = Vec::new();
        let mut shrink = Vec::new();
        let mut budget = avail;
        for e in map.values_mut() {
            // Memory pressure: give ready VMs back, newest first, until above the reserve.
            while let Some(a) = budget {
                if a >= reserve || e.ready.is_empty() {
                    break;
                }
                if let Some(p) = e.ready.pop_back() {
                    e.stats.shrunk += 1;
                    budget = Some(a + u64::from(e.spec.mem_mib));
                    shrink.push(p);
                }
            }
            let have = e.ready.len() + e.stats.starting;
            if have < e.stats.size {
                let need = u64::from(e.spec.mem_mib) + reserve;
                match budget {
                    Some(a) if a < need => {
                        tracing::debug!(lang = %e.spec.lang, available_mib = a, need_mib = need, "pool not refilled: host memory low");
                    }
                    _ => {
                        e.stats.starting += 1;
                        budget = budget.map(|a| a.saturating_sub(u64::from(e.spec.mem_mib)));
                        start.push(e.spec.clone());
                    }
                }
            }
            e.stats.ready = e.ready.len();
        }
        (start, shrink)
    }

    async fn refill_loop(&self) {
        let mut stop = self.inner.stop.subscribe();
        loop {
            if *stop.borrow() {
                return;
            }
            let (start, shrink) = self.plan();
            stop_all(shrink.into());
            for spec in start {
                let p = self.clone();
                tokio::spawn(async move { p.start_one(spec).await });
            }
            tokio::select! {
                _ = self.inner.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.changed() => {}
            }
        }
    }

    async fn start_one(&self, spec: PoolSpec) {
        let Ok(_permit) = self.inner.starting.acquire().await else {
            return;
        };
        // A stop cancels a start in progress (dropping a half-started VM kills and removes it).
        let mut stop = self.inner.stop.subscribe();
        let made = if *stop.borrow() {
            None
        } else {
            tokio::select! {
                r = self.make(&spec) => Some(r),
                _ = stop.wait_for(|s| *s) => None,
            }
        };
        let stopped = *stop.borrow();
        let mut failed = false;
        let leftover = {
            let mut map = self.entries();
            let entry = map.get_mut(&spec.lang);
            match (entry, made) {
                (Some(e), Some(Ok((vm, how, secs)))) if e.spec == spec && !stopped => {
                    e.stats.starting = e.stats.starting.saturating_sub(1);
                    e.stats.last_ready_secs = secs;
                    e.stats.last_start = how.into();
                    e.ready.push_back(Pooled { vm });
                    e.stats.ready = e.ready.len();
                    None
                }
                (Some(e), made) => {
                    e.stats.starting = e.stats.starting.saturating_sub(1);
                    match made {
                        Some(Ok((vm, _, _))) => Some(vm),
                        Some(Err(err)) => {
                            e.stats.failures += 1;
                            failed = true;
                            tracing::warn!(lang = %spec.lang, error = %err, "a pool VM failed to become ready; retrying");
                            None
                        }
                        None => None,
                    }
                }
                (None, Some(Ok((vm, _, _)))) => Some(vm),
                (None, _) => None,
            }
        };
        if let Some(vm) = leftover {
            let _ = vm.vm.stop().await;
        }
        if failed {
            // Do not spin on a broken image or kernel.
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        self.inner.wake.notify_one();
    }

    async fn make(&self, spec: &PoolSpec) -> Result<(ReadyVm, &'static str, f64), crate::RunError> {
        let started = Instant::now();
        let runner = &self.inner.runner;
        if let Some(dir) = &spec.snapshot {
            let run = RunSpec {
                lang: spec.lang.clone(),
                code: String::new(),
                argv: Vec::new(),
                stdin: Vec::new(),
                env: Default::default(),
                timeout: Duration::from_secs(1),
                max_output_bytes: 0,
                mem_mib: spec.mem_mib,
                vcpus: spec.vcpus,
                max_pids: 0,
                rootfs: spec.rootfs.clone(),
                kernel: spec.kernel.clone(),
                files: Vec::new(),
                outputs: None,
                snapshot: Some(dir.clone()),
            };
            match runner.restore(&run, &spec.initramfs, dir).await {
                Ok(vm) => {
                    let vm = prepare_workspace(vm).await?;
                    return Ok((vm, "restore", started.elapsed().as_secs_f64()));
                }
                Err(e) => {
                    tracing::info!(lang = %spec.lang, reason = %e, "pool: booting instead of restoring")
                }
            }
        }
        let vm = runner
            .boot(
                &spec.kernel,
                &spec.initramfs,
                &spec.rootfs,
                spec.mem_mib,
                spec.vcpus,
            )
            .await?;
        let vm = prepare_workspace(vm).await?;
        Ok((vm, "boot", started.elapsed().as_secs_f64()))
    }
}

/// Creates the workspace's `output/` while the VM waits in the pool, so the hand-out does not
/// wait for it. A VM whose agent fails here is stopped and never handed out.
async fn prepare_workspace(mut vm: ReadyVm) -> Result<ReadyVm, crate::RunError> {
    if !vm.client.supports(infra_protocol::FEATURE_FILE_TRANSFER) {
        return Ok(vm);
    }
    match tokio::time::timeout(
        Duration::from_secs(30),
        vm.client.make_dir(crate::OUTPUT_DIR),
    )
    .await
    {
        Ok(Ok(())) => {
            vm.workspace_ready = true;
            Ok(vm)
        }
        Ok(Err(e)) => {
            let _ = vm.vm.stop().await;
            Err(e)
        }
        Err(_) => {
            let console = vm.vm.console_tail(15);
            let _ = vm.vm.stop().await;
            Err(crate::RunError::AgentSilent { secs: 30, console })
        }
    }
}

fn stop_all(vms: VecDeque<Pooled>) {
    if vms.is_empty() {
        return;
    }
    tokio::spawn(async move {
        for p in vms {
            let _ = p.vm.vm.stop().await;
        }
    });
}
