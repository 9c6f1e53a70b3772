//! `POST /api/v1/execute`, `POST /api/v1/execute/stream` (SSE) and `POST /api/v1/run` (the
//! original's batch form). Each execution takes a slot, prepares the language through the core
//! (`infra_runner::prepare::vm_files`: local, else the object store, else a build), and runs in a
//! fresh microVM that is destroyed afterwards.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::Stream;
use infra_runner::{Output, RunOutcome, RunSpec};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::{ApiError, ApiJson, ApiResult, ErrorBody};
use crate::{AppState, LogProgress};

/// A source file of the original API's `files` form.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SourceFile {
    /// File name (a plain name; no directories).
    pub name: String,
    /// File content (text).
    pub content: String,
}

/// `POST /api/v1/execute` body.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecuteRequest {
    /// Language key or alias (`python`, `py`, `nodejs`, `js`, ...).
    pub language: String,
    /// The program. Either this or `files`.
    #[serde(default)]
    pub code: Option<String>,
    /// The original API's form: without `code`, the first file is the program and the others
    /// are written beside it; with `code`, all are written beside it.
    #[serde(default)]
    pub files: Option<Vec<SourceFile>>,
    /// Standard input.
    #[serde(default)]
    pub stdin: Option<String>,
    /// Wall-clock limit for the program, seconds (default and most: the server's config).
    #[serde(default)]
    pub timeout: Option<u64>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: Option<BTreeMap<String, String>>,
    /// Program arguments.
    #[serde(default)]
    pub args: Option<Vec<String>>,
    /// Files API ids placed in the run's workspace under their filenames.
    #[serde(default)]
    pub file_ids: Option<Vec<String>>,
}

/// `POST /api/v1/run` body: the original's batch form (`stdin` may be an array).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    /// Language key or alias.
    pub language: String,
    /// The program. Either this or `files`.
    #[serde(default)]
    pub code: Option<String>,
    /// Source files (see `ExecuteRequest.files`).
    #[serde(default)]
    pub files: Option<Vec<SourceFile>>,
    /// One input, or one per execution.
    #[serde(default)]
    pub stdin: Option<StdinForm>,
    /// Seconds.
    #[serde(default)]
    pub timeout: Option<u64>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: Option<BTreeMap<String, String>>,
    /// Program arguments.
    #[serde(default)]
    pub args: Option<Vec<String>>,
}

/// `stdin` of the batch form.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum StdinForm {
    /// One input.
    One(String),
    /// One execution per input.
    Many(Vec<String>),
}

/// The result of one execution: `run --json`'s shape.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ExecuteResponse {
    /// Request id (`tr-…`).
    pub trace_id: String,
    /// `success`, `error`, `timeout`, `compile_error`, `internal_error`.
    pub status: String,
    /// Program stdout (lossy UTF-8).
    pub stdout: String,
    /// Program stderr (lossy UTF-8).
    pub stderr: String,
    /// Shell-style exit code (124 on timeout, 128+N for signals).
    pub exit_code: i32,
    /// Program wall time, seconds (the run only; a build is in `compile_time`).
    pub exec_time: f64,
    /// Build step wall time, seconds, for compiled languages.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compile_time: Option<f64>,
    /// Language key.
    pub lang: String,
    /// `pool` (a ready VM of the warm pool), `restore` (from the language's snapshot) or `boot`.
    pub start: String,
    /// Why the snapshot was not used, when there is one and the VM booted instead.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_note: Option<String>,
    /// VMM start to ready agent, seconds.
    pub boot_time: f64,
    /// The whole execution, seconds.
    pub total_time: f64,
    /// `firecracker` or `qemu`.
    pub backend: String,
    /// `kvm` or `tcg`.
    pub accel: String,
    /// The wall timeout fired.
    pub timed_out: bool,
    /// Signal that ended the program.
    pub signal: Option<i32>,
    /// stdout was cut at the cap.
    pub stdout_truncated: bool,
    /// stderr was cut at the cap.
    pub stderr_truncated: bool,
    /// Peak memory of the program, bytes.
    pub peak_memory_bytes: Option<u64>,
    /// Compiler output for `compile_error`.
    pub compile_output: Option<String>,
    /// Agent version in the guest.
    pub agent_version: String,
    /// Files the program wrote under `/workspace/output/`, now in the Files API (purpose
    /// `assistants_output`).
    pub output_files: Vec<OutputFileRef>,
    /// Output files not brought back, with the cap they hit.
    pub output_files_skipped: Vec<SkippedFile>,
    /// The program left more files than the listing allows; the rest were not looked at.
    pub output_files_truncated: bool,
    /// The input echoed (batch form with several inputs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
}

/// An output file, stored.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OutputFileRef {
    /// Files API id (`file-…`): fetch with `GET /v1/files/{id}/content`.
    pub id: String,
    /// Path under `output/` (`sub/b.bin`).
    pub path: String,
    /// The file's name (last component of `path`).
    pub filename: String,
    /// Size in bytes.
    pub bytes: u64,
}

/// An output file that was not brought back.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SkippedFile {
    /// Path under `output/`.
    pub path: String,
    /// Size in the guest.
    pub bytes: u64,
    /// `too_many_files`, `file_too_large`, `total_too_large`, or `filename_refused`.
    pub reason: String,
}

/// The response without output file ids yet, and the files the runner brought back.
fn split_outcome(o: RunOutcome) -> (ExecuteResponse, Vec<infra_runner::OutputFile>) {
    // Named in full: a new outcome field must be placed here.
    let RunOutcome {
        trace_id,
        status,
        stdout,
        stderr,
        exit_code,
        exec_time,
        compile_time,
        lang,
        start,
        start_note,
        boot_time,
        total_time,
        backend,
        accel,
        timed_out,
        signal,
        stdout_truncated,
        stderr_truncated,
        peak_memory_bytes,
        compile_output,
        agent_version,
        output_files,
        output_files_skipped,
        output_files_truncated,
    } = o;
    let skipped = output_files_skipped
        .into_iter()
        .map(|s| SkippedFile {
            path: s.name,
            bytes: s.bytes,
            reason: serde_json::to_value(s.reason)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
        })
        .collect();
    let resp = ExecuteResponse {
        trace_id,
        status,
        stdout,
        stderr,
        exit_code,
        exec_time,
        compile_time,
        lang,
        start,
        start_note,
        boot_time,
        total_time,
        backend,
        accel,
        timed_out,
        signal,
        stdout_truncated,
        stderr_truncated,
        peak_memory_bytes,
        compile_output,
        agent_version,
        output_files: Vec::new(),
        output_files_skipped: skipped,
        output_files_truncated,
        stdin: None,
    };
    (resp, output_files)
}

/// Most bytes of code, stdin, env and args in one execution (one protocol frame carries
/// them).
const MAX_EXEC_PAYLOAD: usize = 3 << 20;

/// A checked execution, ready to run.
struct Job {
    lang: infra_languages::Language,
    extra: Vec<SourceFile>,
    file_ids: Vec<String>,
    code: String,
    stdin: Vec<u8>,
    env: BTreeMap<String, String>,
    args: Vec<String>,
    timeout: Duration,
}

fn check_job(state: &AppState, req: ExecuteRequest) -> ApiResult<Job> {
    let ExecuteRequest {
        language,
        code,
        files,
        stdin,
        timeout,
        env,
        args,
        file_ids,
    } = req;
    let lang = infra_runner::prepare::language(&language)
        .map_err(|e| ApiError::bad("language", e.to_string()))?;
    let mut files = files.unwrap_or_default();
    let code = match code {
        Some(c) => c,
        None if !files.is_empty() => files.remove(0).content,
        None => {
            return Err(ApiError::bad(
                "code",
                "either 'code' or 'files' must be provided",
            ))
        }
    };
    if code.trim().is_empty() {
        return Err(ApiError::bad("code", "the code is empty; send a program"));
    }
    for f in &files {
        infra_runner::check_input_name(&f.name)
            .map_err(|e| ApiError::bad("files", e.to_string()))?;
    }
    let file_ids = file_ids.unwrap_or_default();
    if file_ids.len() > 100 {
        return Err(ApiError::bad(
            "file_ids",
            "at most 100 file_ids per execution",
        ));
    }
    let limits = &state.config.runs;
    let secs = timeout.unwrap_or(limits.default_timeout);
    if secs == 0 || secs > limits.max_timeout {
        return Err(ApiError::bad(
            "timeout",
            format!(
                "timeout must be 1 to {} seconds, got {secs}",
                limits.max_timeout
            ),
        ));
    }
    let env = env.unwrap_or_default();
    infra_runner::check_env(&env).map_err(|e| ApiError::bad("env", e.to_string()))?;
    let args = args.unwrap_or_default();
    infra_runner::check_args(&args).map_err(|e| ApiError::bad("args", e.to_string()))?;
    let stdin = stdin.unwrap_or_default().into_bytes();
    let payload = code.len()
        + stdin.len()
        + env.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
        + args.iter().map(String::len).sum::<usize>();
    if payload > MAX_EXEC_PAYLOAD {
        return Err(ApiError::bad(
            "code",
            format!("code, stdin, env and args add up to {payload} bytes; the most is {MAX_EXEC_PAYLOAD} (send large data as files with file_ids)"),
        ));
    }
    Ok(Job {
        lang,
        extra: files,
        file_ids,
        code,
        stdin,
        env,
        args,
        timeout: Duration::from_secs(secs),
    })
}

/// Runs one checked job in a slot; output chunks go to `on_output`.
async fn run_job(
    state: &AppState,
    job: Job,
    on_output: impl FnMut(Output) + Send + 'static,
) -> ApiResult<ExecuteResponse> {
    if *state.stopping.borrow() {
        return Err(ApiError::ShuttingDown);
    }
    let _slot = state.slots.acquire(&state.metrics).await?;
    // Boxed as `Send` here, where the lifetimes are concrete (the streaming route spawns
    // this future, and rustc cannot prove `Send` for the unboxed one there).
    let prepare: std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send + '_>> =
        Box::pin(infra_runner::prepare::vm_files(
            &state.paths,
            &job.lang,
            &state.runner.options().agent,
            &state.overrides,
            Arc::new(LogProgress),
        ));
    let files = prepare.await?;
    let limits = &state.config.runs;
    let (work, inputs) = stage_inputs(state, &job).await?;
    let out_dir = work.path().join("out");
    std::fs::create_dir(&out_dir).map_err(|source| ApiError::Internal {
        what: "cannot create the output directory",
        source,
    })?;
    let spec = RunSpec {
        files: inputs,
        outputs: Some(infra_runner::OutputLimits {
            dir: out_dir,
            max_files: limits.max_output_files,
            max_file_bytes: limits.max_output_file_bytes,
            max_total_bytes: limits.max_output_total_bytes,
        }),
        lang: job.lang.key.clone(),
        code: job.code,
        argv: job.args,
        stdin: job.stdin,
        env: job.env,
        timeout: job.timeout,
        max_output_bytes: limits.max_output_bytes,
        mem_mib: limits.mem_mib,
        vcpus: limits.vcpus,
        max_pids: infra_runner::DEFAULT_MAX_PIDS,
        rootfs: files.rootfs,
        kernel: files.kernel,
        snapshot: files.snapshot,
    };
    state.metrics.vms_live.inc();
    let pooled = state.pool.take(&spec, &files.initramfs);
    let run: std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send + '_>> = Box::pin(
        state
            .runner
            .run_on(&spec, &files.initramfs, pooled, on_output),
    );
    let result = run.await;
    state.metrics.vms_live.dec();
    let status = match &result {
        Ok(o) => o.status.clone(),
        Err(e) => e.kind().as_str().to_string(),
    };
    state
        .metrics
        .runs
        .get_or_create(&crate::metrics::RunLabels {
            language: job.lang.key.clone(),
            status,
        })
        .inc();
    let outcome = result?;
    state.metrics.run_seconds.observe(outcome.total_time);
    let (mut resp, files) = split_outcome(outcome);
    for f in files {
        let filename = f.name.rsplit('/').next().unwrap_or(&f.name).to_string();
        let stored = async {
            let body = tokio::fs::File::open(&f.host_path)
                .await
                .map_err(|source| ApiError::Internal {
                    what: "cannot read an output file",
                    source,
                })?;
            let req = infra_files::NewFile {
                filename: filename.clone(),
                purpose: infra_files::Purpose::AssistantsOutput,
                expires_after: None,
            };
            let body = tokio_util::io::ReaderStream::with_capacity(body, 64 << 10);
            Ok::<_, ApiError>(state.files.create(req, body).await?)
        }
        .await;
        match stored {
            Ok(obj) => resp.output_files.push(OutputFileRef {
                id: obj.id,
                path: f.name,
                filename,
                bytes: obj.bytes,
            }),
            // A name the Files API refuses (it was fine as a path in the guest).
            Err(ApiError::Files(e))
                if matches!(*e, infra_files::FilesError::BadFilename { .. }) =>
            {
                resp.output_files_skipped.push(SkippedFile {
                    path: f.name,
                    bytes: f.bytes,
                    reason: "filename_refused".into(),
                })
            }
            Err(e) => return Err(e),
        }
    }
    drop(work);
    Ok(resp)
}

/// A private directory for one run: `in/<n>` input files, `out/` for the runner's outputs.
/// Removed when dropped.
async fn stage_inputs(
    state: &AppState,
    job: &Job,
) -> ApiResult<(tempfile::TempDir, Vec<infra_runner::InputFile>)> {
    let internal = |what| move |source| ApiError::Internal { what, source };
    let base = state.paths.cache.join("api-runs");
    infra_config::ensure_dir(&base, infra_config::PRIVATE_DIR).map_err(|e| ApiError::Internal {
        what: "cannot prepare the run directory",
        source: std::io::Error::other(e.to_string()),
    })?;
    let work = tempfile::Builder::new()
        .prefix("run-")
        .tempdir_in(&base)
        .map_err(internal("cannot create a run directory"))?;
    let inputs = work.path().join("in");
    std::fs::create_dir(&inputs).map_err(internal("cannot create the input directory"))?;
    let max = state.config.runs.max_input_bytes;
    let mut total = 0u64;
    let mut n = 0usize;
    let mut staged = Vec::new();
    for f in &job.extra {
        total += f.content.len() as u64;
        let source = inputs.join(n.to_string());
        std::fs::write(&source, &f.content).map_err(internal("cannot write an input file"))?;
        staged.push(infra_runner::InputFile {
            name: f.name.clone(),
            source,
        });
        n += 1;
    }
    for id in &job.file_ids {
        let meta = state.files.get(id).await?;
        total += meta.bytes;
        if total > max {
            return Err(ApiError::bad(
                "file_ids",
                format!("the input files add up to more than {max} bytes (runs.max_input_bytes)"),
            ));
        }
        let c = state.files.content(id, None).await?;
        let source = inputs.join(n.to_string());
        let mut out = tokio::fs::File::create(&source)
            .await
            .map_err(internal("cannot write an input file"))?;
        let mut body = c.body;
        use futures::StreamExt;
        use tokio::io::AsyncWriteExt;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(internal("cannot read a file from the store"))?;
            out.write_all(&chunk)
                .await
                .map_err(internal("cannot write an input file"))?;
        }
        out.flush()
            .await
            .map_err(internal("cannot write an input file"))?;
        staged.push(infra_runner::InputFile {
            name: meta.filename,
            source,
        });
        n += 1;
    }
    if total > max {
        return Err(ApiError::bad(
            "files",
            format!("the input files add up to more than {max} bytes (runs.max_input_bytes)"),
        ));
    }
    Ok((work, staged))
}

/// Runs code in a fresh microVM and returns its result.
#[utoipa::path(post, path = "/api/v1/execute", tag = "execution",
    request_body = ExecuteRequest,
    responses(
        (status = 200, description = "The program ran (its own failure is in `status` and `exit_code`)", body = ExecuteResponse),
        (status = 400, description = "Bad request", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 429, description = "Queue full; see Retry-After", body = ErrorBody),
        (status = 500, description = "Host prerequisite missing", body = ErrorBody),
        (status = 502, description = "The sandbox failed", body = ErrorBody),
        (status = 503, description = "Shutting down or a dependency is down", body = ErrorBody),
    ))]
pub async fn execute(
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<ExecuteRequest>,
) -> ApiResult<Json<ExecuteResponse>> {
    let job = check_job(&state, req)?;
    Ok(Json(run_job(&state, job, |_| {}).await?))
}

/// One SSE event of `execute/stream`'s output.
#[derive(Debug, Serialize, ToSchema)]
pub struct OutputEvent {
    /// A chunk of output (lossy UTF-8; a multi-byte character split across chunks shows as
    /// U+FFFD).
    pub data: String,
}

/// Runs code and streams `stdout`, `stderr`, then `exit` (the full result) or `error` events
/// (Server-Sent Events). Closing the connection stops the VM.
#[utoipa::path(post, path = "/api/v1/execute/stream", tag = "execution",
    request_body = ExecuteRequest,
    responses(
        (status = 200, description = "text/event-stream: `stdout` and `stderr` events ({data}), then `exit` (ExecuteResponse) or `error` (ErrorBody)", content_type = "text/event-stream", body = String),
        (status = 400, description = "Bad request", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 429, description = "Queue full; see Retry-After", body = ErrorBody),
    ))]
pub async fn execute_stream(
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<ExecuteRequest>,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let job = check_job(&state, req)?;
    if *state.stopping.borrow() {
        return Err(ApiError::ShuttingDown);
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Event>();
    let task_state = state.clone();
    tokio::spawn(async move {
        let out_tx = tx.clone();
        let run = run_job(&task_state, job, move |o| {
            let (name, d) = match o {
                Output::Stdout(d) => ("stdout", d),
                Output::Stderr(d) => ("stderr", d),
            };
            let ev = OutputEvent {
                data: String::from_utf8_lossy(&d).into_owned(),
            };
            if let Ok(ev) = Event::default().event(name).json_data(ev) {
                let _ = out_tx.send(ev);
            }
        });
        // The client went away: dropping the run stops its VM.
        let closed = tx.clone();
        let ev = tokio::select! {
            r = run => match r {
                Ok(res) => Event::default().event("exit").json_data(res),
                Err(e) => {
                    let resp = e.into_response();
                    let body = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap_or_default();
                    Ok(Event::default().event("error").data(String::from_utf8_lossy(&body)))
                }
            },
            () = closed.closed() => {
                tracing::info!("stream client went away; the run was stopped");
                return;
            }
        };
        if let Ok(ev) = ev {
            let _ = tx.send(ev);
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|ev| (Ok::<_, Infallible>(ev), rx))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// The original API's batch form: `stdin` as an array runs the program once per input (one
/// fresh VM each, in order) and answers an array, each result with its `stdin` echoed.
#[utoipa::path(post, path = "/api/v1/run", tag = "execution",
    request_body = BatchRequest,
    responses(
        (status = 200, description = "One result, or an array with `stdin` array input", body = ExecuteResponse),
        (status = 400, description = "Bad request", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 429, description = "Queue full; see Retry-After", body = ErrorBody),
        (status = 502, description = "The sandbox failed", body = ErrorBody),
    ))]
pub async fn run_batch(
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<BatchRequest>,
) -> ApiResult<Response> {
    let (inputs, many) = match req.stdin {
        None => (vec![String::new()], false),
        Some(StdinForm::One(s)) => (vec![s], false),
        Some(StdinForm::Many(v)) if v.is_empty() => {
            return Err(ApiError::bad(
                "stdin",
                "stdin is an empty array; send at least one input",
            ))
        }
        Some(StdinForm::Many(v)) if v.len() > 100 => {
            return Err(ApiError::bad(
                "stdin",
                format!("{} inputs; the most per request is 100", v.len()),
            ))
        }
        Some(StdinForm::Many(v)) => (v, true),
    };
    let mut jobs = Vec::new();
    for input in &inputs {
        jobs.push(check_job(
            &state,
            ExecuteRequest {
                language: req.language.clone(),
                code: req.code.clone(),
                files: req.files.clone(),
                stdin: Some(input.clone()),
                timeout: req.timeout,
                env: req.env.clone(),
                args: req.args.clone(),
                file_ids: None,
            },
        )?);
    }
    let mut results = Vec::new();
    for (job, input) in jobs.into_iter().zip(inputs) {
        let mut r = run_job(&state, job, |_| {}).await?;
        if many {
            r.stdin = Some(input);
        }
        results.push(r);
    }
    Ok(if many {
        Json(results).into_response()
    } else {
        Json(results.remove(0)).into_response()
    })
}
