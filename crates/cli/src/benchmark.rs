//! `benchmark`: cold boot, restore, pool hand-out and the program's own time, measured with
//! real executions on this host ([`infra_runner::bench`]), as a table or JSON.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use infra_config::Paths;
use infra_runner::bench::{self, BenchOptions, BenchProgress, BenchReport, Stat};
use infra_runner::{prepare, RunSpec};

use crate::run::VmArgs;
use crate::ui::table;

/// `benchmark` flags.
#[derive(Args, Debug)]
#[command(after_help = "Examples:
  infra.operator benchmark
  infra.operator benchmark --lang python --runs 10 --json > bench-$(hostname).json
  infra.operator benchmark -l node --code 'console.log(42)' --no-pool
  infra.operator benchmark --backend firecracker --runs 20   # on a KVM host

Measures, each as min / median / p90 over --runs: cold boot (VMM start to agent ready) and the
whole cold run; the same restored from a snapshot (the language's own when it fits, else one
made for the benchmark and removed after); a warm pool of one VM: what a run on a ready VM adds
to the program's own time, and the refill; the program's own time in the guest. The report
names the backend, its version, the acceleration and the host, so results from different hosts
compare. Every run must exit 0.")]
pub struct BenchmarkArgs {
    /// Language.
    #[arg(short, long, default_value = "python")]
    lang: String,
    /// Program to run [default for python: print(42)].
    #[arg(short, long)]
    code: Option<String>,
    /// Repetitions per measurement.
    #[arg(short = 'n', long, default_value_t = 5)]
    runs: usize,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512)]
    mem: u32,
    /// Guest vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Skip the snapshot restore measurements.
    #[arg(long)]
    no_restore: bool,
    /// Skip the warm pool measurements.
    #[arg(long)]
    no_pool: bool,
    /// The report as JSON on stdout (progress stays on stderr).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    vm: VmArgs,
}

struct Lines;

impl BenchProgress for Lines {
    fn line(&self, text: &str) {
        eprintln!("  {text}");
    }
}

/// Runs `benchmark`.
pub async fn run(a: BenchmarkArgs, paths: &Paths) -> Result<()> {
    if a.runs == 0 || a.runs > 1000 {
        bail!("--runs {} is out of range: give 1 to 1000", a.runs);
    }
    let lang = prepare::language(&a.lang)?;
    let code = match (&a.code, lang.key.as_str()) {
        (Some(c), _) => c.clone(),
        (None, "python") => "print(42)".to_string(),
        (None, other) => {
            bail!("give the program to time with --code (there is no default for {other})")
        }
    };
    infra_runner::check_code(&code)?;
    let runner = a.vm.runner(paths)?;
    let f = a.vm.prepare(paths, &lang, &runner).await?;
    let spec = RunSpec {
        lang: lang.key.clone(),
        code,
        argv: Vec::new(),
        stdin: Vec::new(),
        env: Default::default(),
        timeout: Duration::from_secs(60),
        max_output_bytes: 1 << 20,
        mem_mib: a.mem,
        vcpus: a.vcpus,
        max_pids: infra_runner::DEFAULT_MAX_PIDS,
        rootfs: f.rootfs,
        kernel: f.kernel,
        files: Vec::new(),
        outputs: None,
        snapshot: f.snapshot,
    };
    eprintln!(
        "Benchmarking {} ({} runs each; cold, restore, pool) ...",
        lang.key, a.runs
    );
    let report = bench::run(
        &runner,
        &BenchOptions {
            spec,
            initramfs: f.initramfs,
            runs: a.runs,
            scratch: paths.cache.join("bench"),
            no_restore: a.no_restore,
            no_pool: a.no_pool,
        },
        &Lines,
    )
    .await
    .context("the benchmark stopped")?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(())
}

/// The report as text: what ran where, then one row per measurement.
pub fn render(r: &BenchReport) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "infra.operator {} benchmark, {}: {} {} ({}), {} runs each, {} MiB / {} vCPU\n",
        r.version, r.date, r.backend, r.accel, r.backend_version, r.runs, r.mem_mib, r.vcpus
    ));
    out.push_str(&format!(
        "host: {} × {}, {} MiB, Linux {}, /dev/kvm {}\n",
        r.host.cpu,
        r.host.cpus,
        r.host.mem_total_mib,
        r.host.kernel,
        if r.host.dev_kvm { "present" } else { "absent" }
    ));
    out.push_str(&format!("program ({}): {}\n\n", r.lang, r.code));
    let ms = |s: f64| {
        if s < 1.0 {
            format!("{:.1} ms", s * 1000.0)
        } else {
            format!("{s:.3} s")
        }
    };
    let rows: Vec<Vec<String>> = [
        ("cold boot (to agent ready)", &r.cold_boot),
        ("cold run (whole)", &r.cold_total),
        ("restore (to agent ready)", &r.restore_boot),
        ("run from snapshot (whole)", &r.restore_total),
        ("pool hand-out (added to program)", &r.pool_handout),
        ("pool refill", &r.pool_refill),
        ("program (in the guest)", &r.exec),
    ]
    .into_iter()
    .filter_map(|(what, s): (&str, &Option<Stat>)| {
        let s = s.as_ref()?;
        Some(vec![
            what.to_string(),
            ms(s.min),
            ms(s.median),
            ms(s.p90),
            s.n.to_string(),
        ])
    })
    .collect();
    out.push_str(&table(&["MEASUREMENT", "MIN", "MEDIAN", "P90", "N"], rows));
    out.push('\n');
    if let (Some(c), Some(rs)) = (&r.cold_boot, &r.restore_boot) {
        if rs.median > 0.0 {
            out.push_str(&format!(
                "\nrestore is {:.1}× faster to a ready agent than a cold boot (medians)\n",
                c.median / rs.median
            ));
        }
    }
    for n in &r.notes {
        out.push_str(&format!("note: {n}\n"));
    }
    out
}
