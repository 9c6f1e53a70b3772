//! `run` and `host`: boot a microVM from the language's image and run code in it.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use infra_config::Paths;
use infra_runner::prepare;
use infra_runner::{
    AccelChoice, BackendChoice, Output, RunOutcome, RunSpec, Runner, RunnerOptions,
};

use crate::ui::TerminalProgress;

/// Exit code when the sandbox itself failed (as `docker run` does): the program's own exit
/// codes pass through unchanged, so ours must stay out of their usual range.
pub const SANDBOX_FAILURE: i32 = 125;

/// VM settings shared by `run`, `host` and `rootfs verify`.
#[derive(Args, Debug, Clone)]
pub struct VmArgs {
    /// VMM: auto (Firecracker when present and KVM works, else QEMU), firecracker, qemu.
    #[arg(long, default_value = "auto", value_parser = ["auto", "firecracker", "qemu"])]
    pub backend: String,
    /// QEMU acceleration: auto (KVM when a probe boot works, else TCG), kvm, tcg.
    #[arg(long, default_value = "auto", value_parser = ["auto", "kvm", "tcg"])]
    pub accel: String,
    /// Seconds the VM may take to boot to a ready agent.
    #[arg(long, default_value_t = 120)]
    pub boot_timeout: u64,
    /// Guest kernel (ELF vmlinux) [default: the installed one, /srv/firecracker/vmlinux].
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Root filesystem image: a path, or an image name such as `polyglot`
    /// (rootfs-polyglot.ext4, fetched from the store when missing) [default: the language's
    /// rootfs-{lang}.ext4].
    #[arg(long)]
    pub rootfs: Option<PathBuf>,
    /// qemu-system-x86_64 binary [default: from PATH].
    #[arg(long, env = "INFRA_QEMU")]
    pub qemu: Option<PathBuf>,
    /// firecracker binary [default: from PATH].
    #[arg(long, env = "INFRA_FIRECRACKER")]
    pub firecracker: Option<PathBuf>,
    /// Firecracker's jailer [default: `jailer` from PATH; required when running as root].
    #[arg(long)]
    pub jailer: Option<PathBuf>,
    /// Run Firecracker as root without its jailer (not recommended).
    #[arg(long)]
    pub no_jailer: bool,
    /// Host uids (and gids) for VMM processes, one per VM: FIRST-LAST.
    #[arg(long, default_value = "900000-909999", value_parser = clap::value_parser!(infra_vmm::uid::UidRange))]
    pub vm_uids: infra_vmm::uid::UidRange,
    /// Extra kernel arguments (e.g. `infra.log=debug` for agent logs on the console).
    #[arg(long, default_value = "")]
    pub kernel_args: String,
}

impl VmArgs {
    /// The runner these flags describe.
    pub fn runner(&self, paths: &Paths) -> Result<Runner> {
        let mut o =
            RunnerOptions::for_host().context("cannot locate this executable (the agent)")?;
        o.agent = infra_config::agent_binary(infra_guest::AGENT_BUILD_VERSION)
            .context("cannot locate the agent binary")?;
        o.backend = match self.backend.as_str() {
            "firecracker" => BackendChoice::Firecracker,
            "qemu" => BackendChoice::Qemu,
            _ => BackendChoice::Auto,
        };
        o.accel = match self.accel.as_str() {
            "kvm" => AccelChoice::Kvm,
            "tcg" => AccelChoice::Tcg,
            _ => AccelChoice::Auto,
        };
        o.boot_timeout = Duration::from_secs(self.boot_timeout.max(1));
        o.qemu = self.qemu.clone();
        o.firecracker = self.firecracker.clone();
        o.extra_args = self.kernel_args.clone();
        o.jailer = self.jailer.clone();
        o.no_jailer = self.no_jailer;
        o.vm_uids = self.vm_uids;
        Ok(Runner::new(o, &paths.cache))
    }

    /// The kernel and image these flags name instead of the defaults.
    pub fn overrides(&self) -> prepare::FileOverrides {
        prepare::FileOverrides {
            kernel: self.kernel.clone(),
            rootfs: self.rootfs.clone(),
        }
    }

    /// Kernel, initramfs and image for `lang`, fetched or built first when missing (the
    /// core's policy, [`prepare::vm_files`]).
    pub async fn prepare(
        &self,
        paths: &Paths,
        lang: &infra_languages::Language,
        runner: &Runner,
    ) -> Result<prepare::VmFiles> {
        let f = prepare::vm_files(
            paths,
            lang,
            &runner.options().agent,
            &self.overrides(),
            std::sync::Arc::new(TerminalProgress::on_stderr()),
        )
        .await?;
        Ok(f)
    }
}

/// `run` flags.
#[derive(Args, Debug)]
#[command(after_help = "Examples:
  infra.operator run --lang python --code \"print('hello')\"
  infra.operator run -l go -f main.go --timeout 10 --json
  echo 3 | infra.operator run -l python -c 'print(int(input())*2)' --stdin
  infra.operator run -l python -c 'import os; print(os.environ[\"K\"])' --env K=V
  infra.operator run -l python -f job.py --file-in data.csv --output-dir results

Files: the program runs in /workspace. Each --file-in is copied there first (under NAME, or the
file's own name). What the program writes under /workspace/output/ (relative: output/) comes
back with --output-dir DIR, like `docker cp`: DIR is created if missing, files land under their
names and replace files of the same name; a symlink in DIR is never followed (a name that goes
through one is refused). At most 1000 files, 1 GiB each and 1 GiB in all come back; the rest are
listed as skipped (--json: output_files_skipped). Outputs are collected after a timeout or a
failing program too.

Start: when `snapshot create --lang L` has saved a ready VM of the language with the same image,
kernel, agent, --mem and --vcpus, the run restores it (made unique: fresh entropy and the clock
are pushed into the guest first) instead of booting; --json reports start \"restore\" or \"boot\",
and start_note says why a snapshot was not used. --cold always boots.

The program's exit code is this command's exit code (124 on timeout). When the sandbox itself
fails (no kernel, VM did not boot), the exit code is 125 and the reason is on stderr.")]
pub struct RunArgs {
    /// Language (python, nodejs, go, rust, bash, ... see `rootfs list`).
    #[arg(short, long)]
    lang: String,
    /// Source code to run.
    #[arg(short, long, conflicts_with = "file", required_unless_present = "file")]
    code: Option<String>,
    /// File with the source code.
    #[arg(short, long)]
    file: Option<PathBuf>,
    /// Wall-clock limit in seconds for the program.
    #[arg(short, long, default_value_t = 30)]
    timeout: u64,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512)]
    mem: u32,
    /// Guest vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Most processes and threads the program may have at once.
    #[arg(long, default_value_t = infra_runner::DEFAULT_MAX_PIDS)]
    max_pids: u32,
    /// Standard input for the program: TEXT, or without a value this command's own stdin.
    #[arg(long, num_args = 0..=1, default_missing_value = "-")]
    stdin: Option<String>,
    /// Environment variable for the program (repeatable).
    #[arg(short, long, value_name = "K=V")]
    env: Vec<String>,
    /// Program arguments.
    #[arg(last = true)]
    args: Vec<String>,
    /// Cap on each of stdout and stderr, in bytes (the rest is dropped with a marker).
    #[arg(long, default_value_t = 1 << 20)]
    max_output: u64,
    /// Print one JSON result instead of streaming the output.
    #[arg(long)]
    json: bool,
    /// Copy a host file into the program's workspace, as NAME (a relative path; default: the
    /// file's name). The last ':' separates NAME (repeatable).
    #[arg(long, value_name = "HOST_PATH[:NAME]")]
    file_in: Vec<String>,
    /// Bring the files the program writes under output/ back into DIR (see below).
    #[arg(long, value_name = "DIR")]
    output_dir: Option<PathBuf>,
    /// Boot the kernel even when a snapshot of the language exists (`snapshot create`).
    #[arg(long)]
    cold: bool,
    #[command(flatten)]
    vm: VmArgs,
}

/// Parses `--file-in HOST_PATH[:NAME]`.
fn parse_file_in(v: &str) -> Result<infra_runner::InputFile> {
    let (path, name) = match v.rsplit_once(':') {
        Some((p, n)) if !p.is_empty() && !n.is_empty() => (p, n.to_string()),
        _ => {
            let name = Path::new(v)
                .file_name()
                .and_then(|n| n.to_str())
                .with_context(|| {
                    format!("--file-in {v}: cannot tell the name; use HOST_PATH:NAME")
                })?;
            (v, name.to_string())
        }
    };
    Ok(infra_runner::InputFile {
        name,
        source: PathBuf::from(path),
    })
}

/// `host` flags: the original system's names (`-l`, `-c`, `-t` default 10, `--mem`,
/// `--vcpus`, `--kernel`, `--rootfs`), with its `=== Execution Result ===` output.
#[derive(Args, Debug)]
#[command(after_help = "Examples:
  infra.operator host -l python -c \"print(6*7)\"
  infra.operator host -l bash -c 'echo hi' --mem 256 --vcpus 1 --kernel /srv/firecracker/vmlinux")]
pub struct HostArgs {
    /// Language.
    #[arg(short, long)]
    lang: String,
    /// Source code.
    #[arg(short, long)]
    code: String,
    /// Timeout in seconds.
    #[arg(short, long, default_value_t = 10)]
    timeout: u64,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512)]
    mem: u32,
    /// Guest vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Boot the kernel even when a snapshot of the language exists (`snapshot create`).
    #[arg(long)]
    cold: bool,
    #[command(flatten)]
    vm: VmArgs,
}

/// Runs `run`; returns the process exit code.
pub async fn run(a: RunArgs, paths: &Paths) -> Result<i32> {
    let code = match (&a.code, &a.file) {
        (Some(c), _) => c.clone(),
        (None, Some(f)) => std::fs::read_to_string(f)
            .with_context(|| format!("cannot read --file {}", f.display()))?,
        (None, None) => bail!("give the program with --code or --file"),
    };
    infra_runner::check_code(&code)?;
    infra_runner::check_timeout(Duration::from_secs(a.timeout))?;
    let stdin = match a.stdin.as_deref() {
        None => Vec::new(),
        Some("-") => {
            let mut b = Vec::new();
            std::io::stdin()
                .read_to_end(&mut b)
                .context("cannot read stdin")?;
            b
        }
        Some(t) => t.as_bytes().to_vec(),
    };
    let env = parse_env(&a.env)?;
    let files = a
        .file_in
        .iter()
        .map(|v| parse_file_in(v))
        .collect::<Result<Vec<_>>>()?;
    let lang = prepare::language(&a.lang)?;
    // Refuse bad names before anything is fetched, built or booted.
    infra_runner::check_input_files(&lang.key, &files)?;
    let out_dir = a
        .output_dir
        .as_deref()
        .map(crate::outputs::OutputDir::prepare)
        .transpose()?;
    let runner = a.vm.runner(paths)?;
    let f = a.vm.prepare(paths, &lang, &runner).await?;
    let initramfs = f.initramfs;
    let spec = RunSpec {
        lang: lang.key.clone(),
        code,
        argv: a.args.clone(),
        stdin,
        env,
        timeout: Duration::from_secs(a.timeout.max(1)),
        max_output_bytes: a.max_output,
        mem_mib: a.mem,
        vcpus: a.vcpus,
        max_pids: a.max_pids,
        rootfs: f.rootfs,
        kernel: f.kernel,
        files,
        outputs: out_dir.as_ref().map(|o| o.limits()),
        snapshot: f.snapshot.filter(|_| !a.cold),
    };
    let stream = !a.json;
    let run = runner.run(&spec, &initramfs, |o| {
        if stream {
            match o {
                Output::Stdout(d) => {
                    let mut out = std::io::stdout().lock();
                    let _ = out.write_all(&d);
                    let _ = out.flush();
                }
                Output::Stderr(d) => {
                    let _ = std::io::stderr().write_all(&d);
                }
            }
        }
    });
    let mut outcome = until_interrupted(run).await??;
    if let Some(o) = &out_dir {
        o.place(&mut outcome.output_files)?;
    }
    if a.json {
        println!("{}", serde_json::to_string(&outcome)?);
    } else {
        report_status(&outcome);
    }
    Ok(outcome.exit_code)
}

/// Tells on stderr what the exit code alone does not (timeouts, truncation, compile errors).
fn report_status(o: &RunOutcome) {
    if let Some(n) = &o.start_note {
        eprintln!("infra.operator: booted instead of restoring: {n}");
    }
    if o.timed_out {
        eprintln!("infra.operator: timed out; the program was killed (exit code 124)");
    }
    if let Some(c) = &o.compile_output {
        if o.status == "compile_error" {
            eprintln!("infra.operator: compile error:\n{c}");
        }
    }
    if o.stdout_truncated || o.stderr_truncated {
        eprintln!("infra.operator: output was truncated at the --max-output cap");
    }
    for s in &o.output_files_skipped {
        eprintln!(
            "infra.operator: output file {:?} ({} bytes) not brought back: {}",
            s.name,
            s.bytes,
            match s.reason {
                infra_runner::SkipReason::TooManyFiles => "more than 1000 files",
                infra_runner::SkipReason::FileTooLarge => "larger than 1 GiB",
                infra_runner::SkipReason::TotalTooLarge => "over 1 GiB of output files in all",
            }
        );
    }
    if o.output_files_truncated {
        eprintln!("infra.operator: output/ held more than 1001 files; the rest were not listed");
    }
}

/// Runs `host`; prints the result block; returns the program's exit code.
pub async fn host(a: HostArgs, paths: &Paths) -> Result<i32> {
    infra_runner::check_timeout(Duration::from_secs(a.timeout))?;
    let lang = prepare::language(&a.lang)?;
    let runner = a.vm.runner(paths)?;
    let f = a.vm.prepare(paths, &lang, &runner).await?;
    let initramfs = f.initramfs;
    let spec = RunSpec {
        lang: lang.key.clone(),
        code: a.code,
        argv: Vec::new(),
        stdin: Vec::new(),
        env: BTreeMap::new(),
        timeout: Duration::from_secs(a.timeout.max(1)),
        max_output_bytes: 1 << 20,
        mem_mib: a.mem,
        vcpus: a.vcpus,
        max_pids: infra_runner::DEFAULT_MAX_PIDS,
        rootfs: f.rootfs,
        kernel: f.kernel,
        files: Vec::new(),
        outputs: None,
        snapshot: f.snapshot.filter(|_| !a.cold),
    };
    let outcome = until_interrupted(runner.run(&spec, &initramfs, |_| {})).await??;
    println!("=== Execution Result ===");
    println!("{}", serde_json::to_string_pretty(&outcome)?);
    Ok(outcome.exit_code)
}

/// Exit code after Ctrl-C or SIGTERM (128 + SIGINT, as shells report it).
pub const INTERRUPTED: i32 = 130;

/// The user gave up on the run: reported with exit code [`INTERRUPTED`].
#[derive(Debug)]
pub struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted; the VM was stopped and its files removed")
    }
}

impl std::error::Error for Interrupted {}

/// Runs `fut` unless Ctrl-C or SIGTERM comes first. Dropping the run future drops its VM,
/// which kills the VMM and removes the VM directory, so an interrupted run leaves nothing.
async fn until_interrupted<T>(fut: impl std::future::Future<Output = T>) -> Result<T> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot watch SIGTERM")?;
    tokio::select! {
        r = fut => Ok(r),
        _ = tokio::signal::ctrl_c() => Err(Interrupted.into()),
        _ = term.recv() => Err(Interrupted.into()),
    }
}

fn parse_env(pairs: &[String]) -> Result<BTreeMap<String, String>> {
    pairs
        .iter()
        .map(|kv| {
            let (k, v) = kv
                .split_once('=')
                .with_context(|| format!("--env {kv}: expected KEY=VALUE"))?;
            if k.is_empty() {
                bail!("--env {kv}: empty variable name");
            }
            Ok((k.to_string(), v.to_string()))
        })
        .collect()
}

/// `rootfs verify` flags.
#[derive(Args, Debug)]
#[command(after_help = "Examples:
  infra.operator rootfs verify --lang python
  infra.operator rootfs verify --langs python,java,go --json
  infra.operator rootfs verify --all                      # builds missing images first
  infra.operator rootfs verify --langs python,c,java --rootfs polyglot   # one VM for all

Each language prints its version, then the language table's programs run in the VM as user
code does: hello world (exact stdout, exit 0) and a program that sums stdin and exits 3 (exact
stdout and exit code). A compiled language must also answer a broken program with
compile_error and the compiler's message. Times are the guest's: build and run apart.
Exit status: 0 when every language passed, 1 when any failed.")]
pub struct VerifyArgs {
    /// Language whose image to boot.
    #[arg(short, long, required_unless_present_any = ["langs", "all"], conflicts_with_all = ["langs", "all"])]
    lang: Option<String>,
    /// Several languages (comma separated).
    #[arg(long, value_name = "LIST", conflicts_with = "all")]
    langs: Option<String>,
    /// Every language of the table (unavailable ones are listed with the reason).
    #[arg(long)]
    all: bool,
    /// Virtual CPUs per VM.
    #[arg(long, default_value_t = 2)]
    vcpus: u8,
    /// JSON output.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    vm: VmArgs,
}

/// One language's verdict with the VM and image it ran in.
#[derive(serde::Serialize)]
struct VerifyRow {
    #[serde(flatten)]
    report: infra_runner::verify::LanguageReport,
    image: PathBuf,
    /// Bytes used inside the image's file system (its manifest), when known.
    image_used_bytes: Option<u64>,
    boot_ms: u64,
}

/// Boots each language's image (or one image for all with --rootfs) and runs the table's
/// programs in it.
pub async fn verify(a: VerifyArgs, paths: &Paths) -> Result<()> {
    let table = infra_languages::LanguageTable::builtin();
    let chosen: Vec<&infra_languages::Language> = match (&a.lang, &a.langs, a.all) {
        (Some(l), _, _) => vec![table.get(l)?],
        (None, Some(list), _) => table.select(list)?,
        (None, None, _) => table.iter().collect(),
    };
    let (languages, unavailable): (Vec<_>, Vec<_>) =
        chosen.into_iter().partition(|l| l.installable());
    if !a.all && !unavailable.is_empty() {
        let l = unavailable[0];
        bail!(
            "{} cannot be installed from the package sources this host reaches ({}); its image recipe is {}",
            l.name,
            l.unavailable.as_deref().unwrap_or(""),
            l.image.as_deref().unwrap_or("-")
        );
    }
    let runner = a.vm.runner(paths)?;
    let mut rows: Vec<VerifyRow> = Vec::new();
    let mut disk = String::new();
    let print_row = |row: &VerifyRow| {
        if !a.json {
            eprintln!("{}", progress_line(row));
        }
    };
    if a.vm.rootfs.is_some() {
        // One image for all of them: one VM.
        let files = a.vm.prepare(paths, languages[0], &runner).await?;
        if !a.json {
            eprintln!(
                "Verifying {} language(s) in {} ...",
                languages.len(),
                files.rootfs.display()
            );
        }
        let (boot, reports, df) =
            infra_runner::verify::verify_in_vm(&runner, &files, &languages, a.vcpus).await?;
        disk = df;
        let used = image_used_bytes(&files.rootfs);
        for report in reports {
            let row = VerifyRow {
                report,
                image: files.rootfs.clone(),
                image_used_bytes: used,
                boot_ms: boot.as_millis() as u64,
            };
            print_row(&row);
            rows.push(row);
        }
    } else {
        for lang in &languages {
            if !a.json {
                eprintln!("Verifying {} ...", lang.name);
            }
            let row = match a.vm.prepare(paths, lang, &runner).await {
                Err(e) => VerifyRow {
                    report: infra_runner::verify::LanguageReport::failed(
                        lang,
                        format!("no image: {e:#}"),
                    ),
                    image: paths.image(&lang.key),
                    image_used_bytes: None,
                    boot_ms: 0,
                },
                Ok(files) => {
                    let used = image_used_bytes(&files.rootfs);
                    match infra_runner::verify::verify_in_vm(&runner, &files, &[lang], a.vcpus)
                        .await
                    {
                        Ok((boot, mut reports, df)) if !reports.is_empty() => {
                            if languages.len() == 1 {
                                disk = df;
                            }
                            VerifyRow {
                                report: reports.remove(0),
                                image: files.rootfs.clone(),
                                image_used_bytes: used,
                                boot_ms: boot.as_millis() as u64,
                            }
                        }
                        Ok(_) => unreachable!("one language gives one report"),
                        Err(e) => VerifyRow {
                            report: infra_runner::verify::LanguageReport::failed(
                                lang,
                                format!("the VM failed: {e}"),
                            ),
                            image: files.rootfs.clone(),
                            image_used_bytes: used,
                            boot_ms: 0,
                        },
                    }
                }
            };
            print_row(&row);
            rows.push(row);
        }
    }
    let failed: Vec<&str> = rows
        .iter()
        .filter(|r| !r.report.ok)
        .map(|r| r.report.lang.as_str())
        .collect();
    if a.json {
        let unavailable: Vec<_> = unavailable
            .iter()
            .map(|l| serde_json::json!({"lang": l.key, "name": l.name, "reason": l.unavailable, "image": l.image}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "results": rows,
                "unavailable": unavailable,
                "passed": rows.len() - failed.len(),
                "failed": failed,
                "disk_usage": (!disk.is_empty()).then_some(disk.trim()),
            }))?
        );
    } else {
        print_verify_tables(&rows, &unavailable, &disk);
    }
    if !failed.is_empty() {
        bail!(
            "{} of {} languages failed verification: {}",
            failed.len(),
            rows.len(),
            failed.join(", ")
        );
    }
    Ok(())
}

fn ms(v: Option<u64>) -> String {
    v.map(|m| format!("{:.2} s", m as f64 / 1000.0))
        .unwrap_or_else(|| "-".into())
}

fn progress_line(row: &VerifyRow) -> String {
    let r = &row.report;
    let verdict = if r.ok { "PASS" } else { "FAIL" };
    let why = r
        .error
        .clone()
        .or_else(|| r.checks.iter().find_map(|c| c.problem.clone()))
        .map(|w| format!(": {w}"))
        .unwrap_or_default();
    format!("  {verdict} {} ({}){why}", r.lang, r.version)
}

fn print_verify_tables(rows: &[VerifyRow], unavailable: &[&infra_languages::Language], disk: &str) {
    println!("=== Language Versions ===");
    let width = rows.iter().map(|r| r.report.name.len()).max().unwrap_or(0) + 2;
    for r in rows {
        println!(
            "{:<width$}{}",
            format!("{}:", r.report.name),
            r.report.version
        );
    }
    println!();
    println!("=== Checks ===");
    let check = |r: &VerifyRow, name: &str| match r.report.check(name) {
        Some(c) if c.ok => "ok".to_string(),
        Some(_) => "FAIL".to_string(),
        None => "-".to_string(),
    };
    let table_rows = rows
        .iter()
        .map(|r| {
            let hello = r.report.check("hello");
            vec![
                r.report.lang.clone(),
                check(r, "hello"),
                check(r, "stdin"),
                check(r, "compile_error"),
                ms(hello.and_then(|c| c.build_ms)),
                ms(hello.map(|c| c.run_ms)),
                ms(Some(r.boot_ms)),
                r.image_used_bytes
                    .map(|b| format!("{} MB", b >> 20))
                    .unwrap_or_else(|| "-".into()),
                if r.report.ok { "PASS" } else { "FAIL" }.to_string(),
            ]
        })
        .collect();
    println!(
        "{}",
        crate::ui::table(
            &[
                "LANG",
                "HELLO",
                "STDIN",
                "COMPILE ERROR",
                "BUILD",
                "RUN",
                "BOOT",
                "IMAGE USED",
                "RESULT"
            ],
            table_rows
        )
    );
    for r in rows.iter().filter(|r| !r.report.ok) {
        let why = r
            .report
            .error
            .clone()
            .or_else(|| {
                r.report
                    .checks
                    .iter()
                    .find_map(|c| c.problem.as_ref().map(|p| format!("{}: {p}", c.check)))
            })
            .unwrap_or_default();
        println!("{}: {why}", r.report.lang);
    }
    if !unavailable.is_empty() {
        println!();
        println!("=== Not installable here ===");
        for l in unavailable {
            println!(
                "{}: {} (image: {})",
                l.key,
                l.unavailable.as_deref().unwrap_or(""),
                l.image.as_deref().unwrap_or("-")
            );
        }
    }
    if !disk.is_empty() {
        println!();
        println!("=== Disk Usage ===");
        print!("{disk}");
    }
}

/// Used bytes from the image's manifest, when it has one.
fn image_used_bytes(rootfs: &Path) -> Option<u64> {
    infra_image::Manifest::read(&Paths::manifest_for(rootfs))
        .ok()
        .map(|m| m.used_bytes)
}
