//! The executor: writes the source, builds it if the language needs it, runs it with limits,
//! and streams its output.
//!
//! Process-tree rules:
//! * every build or run is its own session and process group (`setsid` in the child), and,
//!   where cgroup v2 is usable, its own cgroup, joined by the child before `exec`;
//! * at the deadline the group is killed (`killpg(SIGKILL)` plus `cgroup.kill`) and the exec
//!   ends as soon as the direct child is reaped; the pipes are not waited for, so a grandchild
//!   that closed or kept stdout cannot hold the exec open;
//! * when the direct child exits on its own, whatever it left running in its group is killed
//!   too: an exec's processes never outlive it;
//! * output beyond `max_output_bytes` is read and dropped, so the child never blocks on a
//!   full pipe.

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use infra_languages::{Language, LanguageTable};
use infra_protocol::{
    truncate_text, Exec, ExecStatus, Exit, Reply, MAX_COMPILE_OUTPUT, MAX_TIMEOUT_MS,
    TRUNCATION_MARKER,
};
use nix::libc;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::cgroup::{Cgroups, ExecCgroup};
use crate::error::{ExecError, FileError};
use crate::files::{self, Owner};
use crate::reaper::{ChildExit, Reaper};

/// The `PATH` used when neither the image nor the language gives one.
pub(crate) const DEFAULT_PATH: &str =
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How long output is still collected after the process tree is gone (only matters when a
/// process outside the group, e.g. one that called `setsid`, still holds a pipe).
const DRAIN_GRACE: Duration = Duration::from_millis(200);

/// Read size for output pipes; also the largest output event.
const CHUNK: usize = 64 * 1024;

/// Directory under the workspace holding per-exec directories.
pub(crate) const EXEC_DIR: &str = ".exec";

/// Shared state of one running exec, for `Signal` requests.
#[derive(Debug, Default)]
pub(crate) struct ExecHandle {
    /// Process group of the running step, or 0 when nothing runs.
    pub pgid: AtomicI32,
}

/// Runs execs; one per agent.
pub(crate) struct Executor {
    table: &'static LanguageTable,
    workspace: PathBuf,
    run_as: Owner,
    drop_privileges: bool,
    base_env: BTreeMap<String, String>,
    reaper: Reaper,
    cgroups: Option<Cgroups>,
    seq: AtomicU64,
    languages: Vec<String>,
}

/// Where output goes.
#[derive(Clone)]
enum Sink {
    /// Streamed as `stdout`/`stderr` events.
    Events { id: u64, tx: mpsc::Sender<Reply> },
    /// Collected (build output, reported only when the build fails).
    Capture(Arc<Mutex<Vec<u8>>>),
}

impl Sink {
    async fn emit(&self, stderr: bool, data: &[u8]) {
        match self {
            Sink::Events { id, tx } => {
                let id = *id;
                let data = data.to_vec();
                let msg = if stderr {
                    Reply::Stderr { id, data }
                } else {
                    Reply::Stdout { id, data }
                };
                // A closed connection is handled by cancellation; keep draining meanwhile.
                let _ = tx.send(msg).await;
            }
            Sink::Capture(buf) => buf
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend_from_slice(data),
        }
    }
}

/// What one process step needs.
struct Step<'a> {
    argv: Vec<String>,
    env: &'a BTreeMap<String, String>,
    cwd: &'a Path,
    stdin: &'a [u8],
    max_output: u64,
    memory_mb: Option<u64>,
    max_pids: Option<u32>,
    deadline: Instant,
    sink: Sink,
}

/// How one process step ended.
struct StepOutcome {
    exit: ChildExit,
    timed_out: bool,
    cancelled: bool,
    stdout_truncated: bool,
    stderr_truncated: bool,
    peak_memory: Option<u64>,
}

/// Everything the child does between `fork` and `exec`. Only async-signal-safe calls.
struct ChildSetup {
    cgroup_procs: Option<CString>,
    rlimit_as: Option<u64>,
    rlimit_nproc: Option<u64>,
    ids: Option<(u32, u32)>,
    set_groups: bool,
    cwd: CString,
}

impl ChildSetup {
    fn apply(&self) -> io::Result<()> {
        nix::unistd::setsid()?;
        if let Some(procs) = &self.cgroup_procs {
            // SAFETY: `procs` is a valid NUL-terminated path; open/write/close are
            // async-signal-safe and the descriptor is closed before returning.
            unsafe {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                let err = io::Error::last_os_error();
                libc::close(fd);
                if n != 1 {
                    return Err(err);
                }
            }
        }
        // The agent shields itself from the OOM killer (-1000, inherited): give the program
        // the normal score back so a memory hog is what gets killed. Raising is always
        // allowed; failure (no /proc) only keeps the inherited value.
        // SAFETY: a literal NUL-terminated path; open/write/close are async-signal-safe.
        unsafe {
            let fd = libc::open(
                c"/proc/self/oom_score_adj".as_ptr(),
                libc::O_WRONLY | libc::O_CLOEXEC,
            );
            if fd >= 0 {
                libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
            }
        }
        set_rlimit(libc::RLIMIT_CORE, Some(0))?;
        set_rlimit(libc::RLIMIT_AS, self.rlimit_as)?;
        set_rlimit(libc::RLIMIT_NPROC, self.rlimit_nproc)?;
        if let Some((uid, gid)) = self.ids {
            if self.set_groups {
                nix::unistd::setgroups(&[nix::unistd::Gid::from_raw(gid)])?;
            }
            nix::unistd::setgid(nix::unistd::Gid::from_raw(gid))?;
            nix::unistd::setuid(nix::unistd::Uid::from_raw(uid))?;
        }
        // SAFETY: `cwd` is a valid NUL-terminated path.
        if unsafe { libc::chdir(self.cwd.as_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // No execve from here on can grant privileges: setuid/setgid bits and file
        // capabilities are ignored (a setuid-root `su` runs as the caller). A single prctl,
        // async-signal-safe; it cannot be undone by the program.
        nix::sys::prctl::set_no_new_privs()?;
        Ok(())
    }
}

fn set_rlimit(resource: libc::__rlimit_resource_t, limit: Option<u64>) -> io::Result<()> {
    let Some(limit) = limit else { return Ok(()) };
    let rl = libc::rlimit {
        rlim_cur: limit,
        rlim_max: limit,
    };
    // SAFETY: `rl` is a valid rlimit that outlives the call.
    if unsafe { libc::setrlimit(resource, &rl) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A requested limit, lowered to the agent's own hard limit: asking for more than exists
/// means no further limit, not a program that fails to start (raising a hard limit needs
/// `CAP_SYS_RESOURCE`). The value comes from the host, so any `u64` must work.
fn within_hard_limit(resource: nix::sys::resource::Resource, limit: Option<u64>) -> Option<u64> {
    let limit = limit?;
    Some(match nix::sys::resource::getrlimit(resource) {
        Ok((_, hard)) => limit.min(hard),
        Err(_) => limit,
    })
}

/// Kills a process group and its cgroup. Errors (already gone) are ignored.
fn kill_tree(pgid: i32, cg: Option<&ExecCgroup>) {
    if pgid > 0 {
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    }
    if let Some(cg) = cg {
        cg.kill();
    }
}

/// Resolves when the connection's cancel flag is raised (or its sender is gone).
async fn cancelled(rx: &mut watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

async fn pump(pipe: OwnedFd, sink: Sink, stderr: bool, cap: u64, truncated: Arc<AtomicBool>) {
    let Ok(mut rx) = pipe::Receiver::from_owned_fd(pipe) else {
        return;
    };
    let mut buf = vec![0u8; CHUNK];
    let mut sent = 0u64;
    loop {
        let n = match rx.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if truncated.load(Ordering::Relaxed) {
            continue;
        }
        let room = cap.saturating_sub(sent);
        let take = (n as u64).min(room) as usize;
        if take > 0 {
            sink.emit(stderr, &buf[..take]).await;
            sent += take as u64;
        }
        if take < n {
            truncated.store(true, Ordering::Relaxed);
            sink.emit(stderr, TRUNCATION_MARKER.as_bytes()).await;
        }
    }
}

/// Tells the host why a program could not start, on its stderr stream.
async fn report_spawn_failure(events: &mpsc::Sender<Reply>, id: u64, what: &str, e: io::Error) {
    let msg = format!("infra-guest: cannot start {what}: {e}\n");
    let _ = events
        .send(Reply::Stderr {
            id,
            data: msg.into_bytes(),
        })
        .await;
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Finds `prog` on `path` (or checks it directly when it holds a `/`).
pub(crate) fn find_program(prog: &str, path: &str) -> Option<PathBuf> {
    if prog.contains('/') {
        let p = PathBuf::from(prog);
        return is_executable(&p).then_some(p);
    }
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(prog))
        .find(|p| is_executable(p))
}

/// Language keys whose command is installed: the run command, or for compiled languages
/// (run `./main`) the build command.
pub(crate) fn available_languages(table: &LanguageTable, base_path: &str) -> Vec<String> {
    table
        .iter()
        .filter(|l| {
            let run = l.run_argv();
            let prog = match run.first() {
                Some(p) if p.starts_with("./") => l.build_argv().and_then(|b| b.first().cloned()),
                other => other.cloned(),
            };
            prog.is_some_and(|p| find_program(&p, &l.path_var(Some(base_path))).is_some())
        })
        .map(|l| l.key.clone())
        .collect()
}

fn check_str(what: &'static str, s: &str) -> Result<(), ExecError> {
    if s.contains('\0') {
        return Err(ExecError::Invalid {
            what,
            reason: "contains a NUL byte",
        });
    }
    Ok(())
}

impl Executor {
    /// A new executor. `run_as` is the resolved user (`None`: keep the agent's own).
    pub(crate) fn new(
        workspace: PathBuf,
        run_as: Owner,
        base_env: BTreeMap<String, String>,
        reaper: Reaper,
        cgroups: Option<Cgroups>,
    ) -> Self {
        let table = LanguageTable::builtin();
        let base_path = base_env.get("PATH").map_or(DEFAULT_PATH, String::as_str);
        let languages = available_languages(table, base_path);
        Self {
            table,
            workspace,
            run_as,
            drop_privileges: nix::unistd::geteuid().is_root(),
            base_env,
            reaper,
            cgroups,
            seq: AtomicU64::new(0),
            languages,
        }
    }

    /// Language keys found on this machine.
    pub(crate) fn languages(&self) -> &[String] {
        &self.languages
    }

    /// The environment for a language: image env, then the language's env and PATH, then
    /// the request's env.
    fn environment(
        &self,
        lang: &Language,
        extra: &BTreeMap<String, String>,
    ) -> BTreeMap<String, String> {
        let mut env = self.base_env.clone();
        let base_path = env.get("PATH").cloned();
        env.extend(lang.env.clone());
        env.insert(
            "PATH".into(),
            lang.path_var(base_path.as_deref().or(Some(DEFAULT_PATH))),
        );
        env.extend(extra.clone());
        env
    }

    /// Creates the working directory and writes the source file. Returns the directory and
    /// whether it must be removed afterwards.
    fn prepare_dir(
        &self,
        id: u64,
        req: &Exec,
        lang: &Language,
    ) -> Result<(PathBuf, bool), ExecError> {
        let (dir_fd, path, fresh) = match &req.workdir {
            Some(rel) => {
                let comps = files::dir_components(rel)?;
                let fd = files::open_dir(&self.workspace, rel, &comps, None)?;
                let path = comps.iter().fold(self.workspace.clone(), |p, c| p.join(c));
                (fd, path, false)
            }
            None => {
                let name = format!("{id}-{}", self.seq.fetch_add(1, Ordering::Relaxed));
                let rel = format!("{EXEC_DIR}/{name}");
                let parent = files::open_dir(&self.workspace, &rel, &[OsStr::new(EXEC_DIR)], None)?;
                let io = |e: nix::Error| FileError::Io {
                    path: rel.clone(),
                    source: e.into(),
                };
                nix::sys::stat::mkdirat(
                    &parent,
                    name.as_str(),
                    nix::sys::stat::Mode::from_bits_truncate(0o700),
                )
                .map_err(io)?;
                let fd = files::open_dir(
                    &self.workspace,
                    &rel,
                    &[OsStr::new(EXEC_DIR), OsStr::new(&name)],
                    None,
                )?;
                if let Some((u, g)) = self.run_as {
                    nix::unistd::fchown(&fd, Some(u.into()), Some(g.into())).map_err(io)?;
                }
                (fd, self.workspace.join(EXEC_DIR).join(&name), true)
            }
        };
        let write = files::write_in(
            &dir_fd,
            OsStr::new(&lang.file),
            req.code.as_bytes(),
            0o644,
            self.run_as,
            &lang.file,
            false,
        );
        if let Err(e) = write {
            if fresh {
                let _ = std::fs::remove_dir_all(&path);
            }
            return Err(e.into());
        }
        Ok((path, fresh))
    }

    /// Runs one exec to the end. `Ok(None)` when the connection went away (the process tree
    /// has been killed and there is nobody to report to).
    pub(crate) async fn exec(
        &self,
        id: u64,
        req: Exec,
        handle: &ExecHandle,
        events: &mpsc::Sender<Reply>,
        mut cancel: watch::Receiver<bool>,
    ) -> Result<Option<Exit>, ExecError> {
        let lang = self.table.get(&req.lang)?;
        if req.timeout_ms > MAX_TIMEOUT_MS {
            return Err(ExecError::Invalid {
                what: "timeout_ms",
                reason: "more than 24 hours (MAX_TIMEOUT_MS)",
            });
        }
        for a in &req.argv {
            check_str("argv", a)?;
        }
        for (k, v) in &req.env {
            check_str("env", k)?;
            check_str("env", v)?;
            if k.is_empty() || k.contains('=') {
                return Err(ExecError::Invalid {
                    what: "env",
                    reason: "names must be non-empty and have no '='",
                });
            }
        }
        let env = self.environment(lang, &req.env);
        let (dir, fresh) = self.prepare_dir(id, &req, lang)?;
        let start = Instant::now();
        let deadline = start + Duration::from_millis(req.timeout_ms);
        let result = self
            .build_and_run(
                id,
                &req,
                lang,
                &env,
                &dir,
                deadline,
                handle,
                events,
                &mut cancel,
            )
            .await;
        if fresh {
            let dir = dir.clone();
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
        }
        Ok(result.map(|mut exit| {
            exit.id = id;
            exit
        }))
    }

    #[allow(clippy::too_many_arguments)]
    async fn build_and_run(
        &self,
        id: u64,
        req: &Exec,
        lang: &Language,
        env: &BTreeMap<String, String>,
        dir: &Path,
        deadline: Instant,
        handle: &ExecHandle,
        events: &mpsc::Sender<Reply>,
        cancel: &mut watch::Receiver<bool>,
    ) -> Option<Exit> {
        let mut blank = Exit {
            id,
            status: ExecStatus::InternalError,
            exit_code: None,
            signal: None,
            timed_out: false,
            wall_ms: 0,
            build_ms: None,
            peak_memory_bytes: None,
            stdout_truncated: false,
            stderr_truncated: false,
            compile_output: None,
        };
        if let Some(build) = lang.build_argv() {
            let build_start = Instant::now();
            let captured = Arc::new(Mutex::new(Vec::new()));
            let step = Step {
                argv: build.clone(),
                env,
                cwd: dir,
                stdin: &[],
                max_output: req.max_output_bytes,
                memory_mb: req.memory_mb,
                max_pids: req.max_pids,
                deadline,
                sink: Sink::Capture(Arc::clone(&captured)),
            };
            let out = self.run_step(step, handle, cancel).await;
            blank.build_ms = Some(build_start.elapsed().as_millis() as u64);
            let out = match out {
                Ok(out) => out,
                Err(e) => {
                    report_spawn_failure(events, id, &build[0], e).await;
                    return Some(blank);
                }
            };
            if out.cancelled {
                return None;
            }
            if out.timed_out {
                let (status, exit_code) = ExecStatus::classify(out.exit.code, true);
                return Some(Exit {
                    status,
                    exit_code,
                    signal: out.exit.signal,
                    timed_out: true,
                    peak_memory_bytes: out.peak_memory,
                    ..blank
                });
            }
            if out.exit.code != Some(0) {
                let text =
                    String::from_utf8_lossy(&captured.lock().unwrap_or_else(|e| e.into_inner()))
                        .into_owned();
                // The build's two streams are captured up to `max_output_bytes` each, which
                // may be far more than one frame holds.
                let text = truncate_text(text, MAX_COMPILE_OUTPUT);
                return Some(Exit {
                    status: ExecStatus::CompileError,
                    exit_code: out.exit.code,
                    signal: out.exit.signal,
                    peak_memory_bytes: out.peak_memory,
                    compile_output: Some(text),
                    ..blank
                });
            }
        }
        let mut argv = lang.run_argv();
        argv.extend(req.argv.iter().cloned());
        let step = Step {
            argv: argv.clone(),
            env,
            cwd: dir,
            stdin: &req.stdin,
            max_output: req.max_output_bytes,
            memory_mb: req.memory_mb,
            max_pids: req.max_pids,
            deadline,
            sink: Sink::Events {
                id,
                tx: events.clone(),
            },
        };
        let run_start = Instant::now();
        let out = self.run_step(step, handle, cancel).await;
        let wall_ms = run_start.elapsed().as_millis() as u64;
        let out = match out {
            Ok(out) => out,
            Err(e) => {
                report_spawn_failure(events, id, &argv[0], e).await;
                return Some(blank);
            }
        };
        if out.cancelled {
            return None;
        }
        let (status, exit_code) = ExecStatus::classify(out.exit.code, out.timed_out);
        Some(Exit {
            status,
            exit_code,
            signal: out.exit.signal,
            timed_out: out.timed_out,
            wall_ms,
            peak_memory_bytes: out.peak_memory,
            stdout_truncated: out.stdout_truncated,
            stderr_truncated: out.stderr_truncated,
            ..blank
        })
    }

    /// Spawns one process in its own group (and cgroup), feeds stdin, pumps output, enforces
    /// the deadline, and reaps it. An `Err` means it could not be started.
    async fn run_step(
        &self,
        step: Step<'_>,
        handle: &ExecHandle,
        cancel: &mut watch::Receiver<bool>,
    ) -> io::Result<StepOutcome> {
        let memory_bytes = step.memory_mb.map(|m| m.saturating_mul(1 << 20));
        let cg = match &self.cgroups {
            Some(c) => {
                let name = format!("exec-{}", self.seq.fetch_add(1, Ordering::Relaxed));
                match c.create(&name, memory_bytes, step.max_pids) {
                    Ok(cg) => Some(cg),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot create exec cgroup; using rlimits");
                        None
                    }
                }
            }
            _ => None,
        };
        let cg_memory = cg.is_some() && self.cgroups.as_ref().is_some_and(Cgroups::has_memory);
        let cg_pids = cg.is_some() && self.cgroups.as_ref().is_some_and(Cgroups::has_pids);
        let setup = ChildSetup {
            cgroup_procs: cg.as_ref().map(|c| c.procs_path().clone()),
            rlimit_as: within_hard_limit(
                nix::sys::resource::Resource::RLIMIT_AS,
                memory_bytes.filter(|_| !cg_memory),
            ),
            rlimit_nproc: within_hard_limit(
                nix::sys::resource::Resource::RLIMIT_NPROC,
                step.max_pids.map(u64::from).filter(|_| !cg_pids),
            ),
            ids: self.run_as,
            set_groups: self.drop_privileges,
            cwd: CString::new(files::bytes(step.cwd)).map_err(io::Error::other)?,
        };
        let mut cmd = std::process::Command::new(&step.argv[0]);
        cmd.args(&step.argv[1..])
            .env_clear()
            .envs(step.env)
            .stdin(if step.stdin.is_empty() {
                Stdio::null()
            } else {
                Stdio::piped()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: `apply` only makes async-signal-safe system calls on data prepared before
        // the fork, and allocates nothing.
        unsafe {
            cmd.pre_exec(move || setup.apply());
        }
        let (mut child, exit_rx) = match self.reaper.spawn(|| cmd.spawn()) {
            Ok(x) => x,
            Err(e) => {
                if let Some(cg) = cg {
                    cg.remove();
                }
                return Err(e);
            }
        };
        let pgid = child.id() as i32;
        handle.pgid.store(pgid, Ordering::SeqCst);

        let stdin_task = child.stdin.take().map(|s| {
            let data = step.stdin.to_vec();
            tokio::spawn(async move {
                if let Ok(mut tx) = pipe::Sender::from_owned_fd(OwnedFd::from(s)) {
                    let _ = tx.write_all(&data).await;
                }
            })
        });
        let out_trunc = Arc::new(AtomicBool::new(false));
        let err_trunc = Arc::new(AtomicBool::new(false));
        let mut pumps = Vec::new();
        if let Some(out) = child.stdout.take() {
            pumps.push(tokio::spawn(pump(
                OwnedFd::from(out),
                step.sink.clone(),
                false,
                step.max_output,
                Arc::clone(&out_trunc),
            )));
        }
        if let Some(err) = child.stderr.take() {
            pumps.push(tokio::spawn(pump(
                OwnedFd::from(err),
                step.sink.clone(),
                true,
                step.max_output,
                Arc::clone(&err_trunc),
            )));
        }
        // The reaper owns waiting; the `Child` is only dropped (which neither waits nor kills).
        drop(child);

        let mut exit_rx = exit_rx;
        let (exit, timed_out, was_cancelled) = tokio::select! {
            r = &mut exit_rx => (r.unwrap_or_default(), false, false),
            _ = tokio::time::sleep_until(step.deadline) => {
                kill_tree(pgid, cg.as_ref());
                (exit_rx.await.unwrap_or_default(), true, false)
            }
            _ = cancelled(cancel) => {
                kill_tree(pgid, cg.as_ref());
                (exit_rx.await.unwrap_or_default(), false, true)
            }
        };
        handle.pgid.store(0, Ordering::SeqCst);
        // Nothing of this step outlives its main process.
        kill_tree(pgid, cg.as_ref());
        let drain = async {
            for p in pumps.iter_mut() {
                let _ = p.await;
            }
        };
        if tokio::time::timeout(DRAIN_GRACE, drain).await.is_err() {
            tracing::debug!(pgid, "output still open after the process tree was killed");
        }
        for p in &pumps {
            p.abort();
        }
        if let Some(t) = stdin_task {
            t.abort();
        }
        let peak_memory = cg
            .as_ref()
            .and_then(ExecCgroup::peak_memory)
            .or(exit.maxrss_bytes);
        if let Some(cg) = cg {
            cg.remove();
        }
        Ok(StepOutcome {
            exit,
            timed_out,
            cancelled: was_cancelled,
            stdout_truncated: out_trunc.load(Ordering::Relaxed),
            stderr_truncated: err_trunc.load(Ordering::Relaxed),
            peak_memory,
        })
    }
}
