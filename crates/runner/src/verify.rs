//! `rootfs verify`: proves a language works in a real VM. The image is booted, the language
//! prints its version, then the language table's two programs run through the agent exactly as
//! user code does (hello world, and a program that reads stdin and exits non-zero), and their
//! output and exit codes are compared with the table's. A compiled language must also turn a
//! broken program into `compile_error` with the compiler's message.
//!
//! One VM can carry many languages (a polyglot image): [`verify_in_vm`] checks each in turn.

use std::time::{Duration, Instant};

use infra_languages::{Language, Program};
use infra_protocol::{Exec, ExecStatus, Exit};
use serde::Serialize;

use crate::client::Output;
use crate::{ReadyVm, RunError, Runner};

/// Source that no compiler accepts, for the compile-error check.
const BROKEN_SOURCE: &str = "@@ this is not a program ( {{ \n";

/// What one check found.
#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    /// `hello`, `stdin` or `compile_error`.
    pub check: String,
    /// The output and exit code matched.
    pub ok: bool,
    /// What differed, in one line; `None` when `ok`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    /// `success`, `error`, `timeout`, `compile_error`, `internal_error`.
    pub status: String,
    /// The program's exit code.
    pub exit_code: Option<i32>,
    /// Build step time in the guest, milliseconds (compiled languages).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub build_ms: Option<u64>,
    /// Run time in the guest, milliseconds (excludes the build).
    pub run_ms: u64,
    /// Host-side time for the whole exec (request to exit), milliseconds.
    pub exec_ms: u64,
}

impl CheckResult {
    fn new(check: &str, problem: Option<String>, exit: &Exit, took: Duration) -> Self {
        Self {
            check: check.into(),
            ok: problem.is_none(),
            problem,
            status: exit.status.as_str().into(),
            exit_code: exit.exit_code,
            build_ms: exit.build_ms,
            run_ms: exit.wall_ms,
            exec_ms: took.as_millis() as u64,
        }
    }
}

/// One language's verdict.
#[derive(Debug, Clone, Serialize)]
pub struct LanguageReport {
    /// Language key.
    pub lang: String,
    /// Display name.
    pub name: String,
    /// First line of the version command's output.
    pub version: String,
    /// Every check ran and matched.
    pub ok: bool,
    /// The checks, in order.
    pub checks: Vec<CheckResult>,
    /// Why the language could not be checked at all (no VM, version command failed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl LanguageReport {
    /// A report for a language whose checks never ran.
    pub fn failed(lang: &Language, error: String) -> Self {
        Self {
            lang: lang.key.clone(),
            name: lang.name.clone(),
            version: String::new(),
            ok: false,
            checks: Vec::new(),
            error: Some(error),
        }
    }

    /// The named check, if it ran.
    pub fn check(&self, name: &str) -> Option<&CheckResult> {
        self.checks.iter().find(|c| c.check == name)
    }
}

/// Memory a VM needs to verify these languages: the largest the table asks for.
pub fn memory_for(languages: &[&Language]) -> u32 {
    languages
        .iter()
        .map(|l| l.mem_mb)
        .max()
        .unwrap_or(512)
        .min(u64::from(u32::MAX)) as u32
}

/// Where the initramfs leaves the read-only image visible in the guest.
const IMAGE_MOUNT: &str = "/mnt/image";

/// Boots `rootfs` once and verifies each language in it. Returns the boot time, the reports
/// and `df -h` of the image as the guest sees it.
pub async fn verify_in_vm(
    runner: &Runner,
    files: &crate::prepare::VmFiles,
    languages: &[&Language],
    vcpus: u8,
) -> Result<(Duration, Vec<LanguageReport>, String), RunError> {
    let mut ready = runner
        .boot(
            &files.kernel,
            &files.initramfs,
            &files.rootfs,
            memory_for(languages),
            vcpus,
        )
        .await?;
    let boot = ready.boot;
    let mut reports = Vec::new();
    for lang in languages {
        let report = verify_language(&mut ready, lang).await;
        let lost = report
            .error
            .as_deref()
            .is_some_and(|e| e.starts_with("the VM"));
        reports.push(report);
        if lost {
            break;
        }
    }
    let mut df = Exec::new("bash", format!("df -h {IMAGE_MOUNT} 2>&1\n"));
    df.timeout_ms = 60_000;
    let disk = match exec_collect(&mut ready, df).await {
        Ok((_, out, _, _)) => String::from_utf8_lossy(&out).into_owned(),
        Err(_) => String::new(),
    };
    ready.vm.stop().await?;
    Ok((boot, reports, disk))
}

/// Runs the version command and the checks of one language in a ready VM.
pub async fn verify_language(ready: &mut ReadyVm, lang: &Language) -> LanguageReport {
    if !ready.info.languages.contains(&lang.key) {
        return LanguageReport::failed(
            lang,
            format!(
                "the agent does not find {}'s run command in this image (languages found: {})",
                lang.key,
                ready.info.languages.join(", ")
            ),
        );
    }
    let version = match version_line(ready, lang).await {
        Ok(v) => v,
        Err(e) => return LanguageReport::failed(lang, format!("the VM stopped answering: {e}")),
    };
    let mut checks = Vec::new();
    let lost = |version: String, checks: Vec<CheckResult>, e: RunError| {
        let mut r = LanguageReport::failed(lang, format!("the VM stopped answering: {e}"));
        r.version = version;
        r.checks = checks;
        r
    };
    for (name, program) in [("hello", &lang.hello), ("stdin", &lang.stdin)] {
        match run_program(ready, lang, name, program).await {
            Ok(c) => checks.push(c),
            Err(e) => return lost(version, checks, e),
        }
    }
    if lang.build_argv().is_some() {
        match compile_error_check(ready, lang).await {
            Ok(c) => checks.push(c),
            Err(e) => return lost(version, checks, e),
        }
    }
    LanguageReport {
        lang: lang.key.clone(),
        name: lang.name.clone(),
        ok: checks.iter().all(|c| c.ok) && !version.is_empty(),
        error: version
            .is_empty()
            .then(|| "the version command printed nothing".to_string()),
        version,
        checks,
    }
}

/// The first line the language's version command prints (stdout or stderr), run by bash with
/// the language's own environment and PATH.
async fn version_line(ready: &mut ReadyVm, lang: &Language) -> Result<String, RunError> {
    let quoted: Vec<String> = lang.version.iter().map(|w| shell_quote(w)).collect();
    let mut exec = Exec::new(
        "bash",
        format!(
            "{} 2>&1 | grep -v '^Picked up ' | head -n 1\n",
            quoted.join(" ")
        ),
    );
    exec.env = lang.env.clone();
    exec.env.insert("PATH".into(), lang.path_var(None));
    exec.timeout_ms = lang.timeout_s.saturating_mul(1000);
    let mut out = Vec::new();
    ready
        .client
        .exec(exec, |o| {
            let (Output::Stdout(d) | Output::Stderr(d)) = o;
            out.extend_from_slice(&d);
        })
        .await?;
    Ok(String::from_utf8_lossy(&out).trim().to_string())
}

async fn exec_collect(
    ready: &mut ReadyVm,
    exec: Exec,
) -> Result<(Exit, Vec<u8>, Vec<u8>, Duration), RunError> {
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let started = Instant::now();
    let exit = ready
        .client
        .exec(exec, |o| match o {
            Output::Stdout(d) => stdout.extend_from_slice(&d),
            Output::Stderr(d) => stderr.extend_from_slice(&d),
        })
        .await?;
    Ok((exit, stdout, stderr, started.elapsed()))
}

async fn run_program(
    ready: &mut ReadyVm,
    lang: &Language,
    name: &str,
    program: &Program,
) -> Result<CheckResult, RunError> {
    let mut exec = Exec::new(&lang.key, program.code.clone());
    exec.stdin = program.input.clone().into_bytes();
    exec.timeout_ms = lang.timeout_s.saturating_mul(1000);
    let (exit, stdout, stderr, took) = exec_collect(ready, exec).await?;
    let problem = compare(program, &exit, &stdout, &stderr);
    Ok(CheckResult::new(name, problem, &exit, took))
}

async fn compile_error_check(
    ready: &mut ReadyVm,
    lang: &Language,
) -> Result<CheckResult, RunError> {
    let mut exec = Exec::new(&lang.key, BROKEN_SOURCE);
    exec.timeout_ms = lang.timeout_s.saturating_mul(1000);
    let (exit, _, _, took) = exec_collect(ready, exec).await?;
    let message = exit.compile_output.clone().unwrap_or_default();
    let problem = if exit.status != ExecStatus::CompileError {
        Some(format!(
            "a broken program gave {} instead of compile_error",
            exit.status.as_str()
        ))
    } else if message.trim().is_empty() {
        Some("compile_error came without the compiler's message".into())
    } else {
        None
    };
    Ok(CheckResult::new("compile_error", problem, &exit, took))
}

/// What differs between a program's expected and actual result, in one line.
pub fn compare(program: &Program, exit: &Exit, stdout: &[u8], stderr: &[u8]) -> Option<String> {
    let tail = |b: &[u8]| {
        let text = String::from_utf8_lossy(b);
        let t = text.trim();
        let start = t.len().saturating_sub(300);
        let start = (start..=t.len())
            .find(|i| t.is_char_boundary(*i))
            .unwrap_or(t.len());
        t[start..].replace('\n', " | ")
    };
    if exit.status == ExecStatus::CompileError {
        return Some(format!(
            "compile error: {}",
            tail(exit.compile_output.as_deref().unwrap_or("").as_bytes())
        ));
    }
    if exit.status == ExecStatus::Timeout {
        return Some("timed out".into());
    }
    if stdout != program.stdout.as_bytes() {
        return Some(format!(
            "stdout {:?}, expected {:?}; stderr: {}",
            String::from_utf8_lossy(stdout),
            program.stdout,
            tail(stderr)
        ));
    }
    if exit.exit_code != Some(program.exit_code) {
        return Some(format!(
            "exit code {:?}, expected {}; stderr: {}",
            exit.exit_code,
            program.exit_code,
            tail(stderr)
        ));
    }
    None
}

fn shell_quote(w: &str) -> String {
    if w.chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_./=:".contains(c))
    {
        w.to_string()
    } else {
        format!("'{}'", w.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exit(status: ExecStatus, code: i32) -> Exit {
        Exit {
            id: 1,
            status,
            exit_code: Some(code),
            signal: None,
            timed_out: false,
            wall_ms: 1,
            build_ms: None,
            peak_memory_bytes: None,
            stdout_truncated: false,
            stderr_truncated: false,
            compile_output: None,
        }
    }

    #[test]
    fn programs_must_match_output_and_exit_code() {
        let p = Program {
            code: String::new(),
            input: "1\n".into(),
            stdout: "10\n".into(),
            exit_code: 3,
        };
        assert_eq!(compare(&p, &exit(ExecStatus::Error, 3), b"10\n", b""), None);
        let wrong_out = compare(&p, &exit(ExecStatus::Error, 3), b"10", b"").unwrap();
        assert!(wrong_out.contains("expected \"10\\n\""), "{wrong_out}");
        let wrong_code = compare(&p, &exit(ExecStatus::Success, 0), b"10\n", b"boom").unwrap();
        assert!(
            wrong_code.contains("exit code Some(0), expected 3"),
            "{wrong_code}"
        );
        assert!(wrong_code.contains("boom"), "{wrong_code}");
        let mut ce = exit(ExecStatus::CompileError, 1);
        ce.compile_output = Some("main.c:1: error".into());
        assert!(compare(&p, &ce, b"", b"")
            .unwrap()
            .contains("main.c:1: error"));
    }

    #[test]
    fn memory_is_the_largest_asked_for() {
        let t = infra_languages::LanguageTable::builtin();
        let py = t.get("python").unwrap();
        let java = t.get("java").unwrap();
        assert_eq!(memory_for(&[py]), py.mem_mb as u32);
        assert_eq!(memory_for(&[py, java]), py.mem_mb.max(java.mem_mb) as u32);
    }
}
