//! Running the standard host tools (e2fsprogs, debootstrap) with clear errors when they are
//! missing or fail.

use std::path::PathBuf;
use std::process::{Command, Output};

use crate::error::{Error, Result};

/// Finds `tool` (see [`infra_config::find_executable`]), naming its Debian package if absent.
pub fn find(tool: &str, package: &str) -> Result<PathBuf> {
    infra_config::find_executable(tool).ok_or_else(|| Error::MissingTool {
        tool: tool.into(),
        package: package.into(),
    })
}

/// Runs a command to completion, returning its output or a [`Error::ToolFailed`] with the tail
/// of what it printed.
pub fn run(tool: &str, cmd: &mut Command) -> Result<Output> {
    tracing::debug!(?cmd, "running");
    let out = cmd.output().map_err(|e| Error::io("run", tool, e))?;
    if !out.status.success() {
        return Err(failed(tool, &out));
    }
    Ok(out)
}

/// Builds the error for a tool that exited non-zero.
pub fn failed(tool: &str, out: &Output) -> Error {
    let mut text = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if text.is_empty() {
        text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    }
    let tail: Vec<&str> = text.lines().rev().take(6).collect();
    Error::ToolFailed {
        tool: tool.into(),
        status: out.status.to_string(),
        output: tail.into_iter().rev().collect::<Vec<_>>().join(" | "),
    }
}
