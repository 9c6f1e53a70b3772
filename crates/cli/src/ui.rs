//! Terminal rendering: numbered steps, indicatif bars for transfers, tables.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::Mutex;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Draws library progress on the terminal (bars only when stderr is a terminal).
pub struct TerminalProgress {
    multi: MultiProgress,
    bars: Mutex<HashMap<String, ProgressBar>>,
    tty: bool,
    lines_to_stderr: bool,
}

impl TerminalProgress {
    /// A renderer for this process's terminal.
    pub fn new() -> Self {
        let tty = std::io::stderr().is_terminal();
        let target = if tty {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        Self {
            multi: MultiProgress::with_draw_target(target),
            bars: Mutex::new(HashMap::new()),
            tty,
            lines_to_stderr: false,
        }
    }

    /// A renderer that keeps stdout for a program's own output (`run`): every line goes to
    /// stderr.
    pub fn on_stderr() -> Self {
        Self {
            lines_to_stderr: true,
            ..Self::new()
        }
    }

    /// Prints a line without tearing the bars.
    pub fn line(&self, text: &str) {
        if self.tty {
            let _ = self.multi.println(text);
        } else if self.lines_to_stderr {
            eprintln!("{text}");
        } else {
            println!("{text}");
        }
    }
}

impl infra_image::Progress for TerminalProgress {
    fn step(&self, index: usize, total: usize, message: &str) {
        if total == 0 {
            self.line(message);
        } else {
            self.line(&format!("[{index}/{total}] {message}"));
        }
    }

    fn transfer_start(&self, id: &str, label: &str, total: Option<u64>) {
        let bar = match total {
            Some(t) => ProgressBar::new(t).with_style(
                ProgressStyle::with_template(
                    "  {msg:24} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            ),
            None => ProgressBar::new_spinner().with_style(
                ProgressStyle::with_template("  {spinner} {msg:24} {bytes} {binary_bytes_per_sec}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            ),
        };
        let bar = self.multi.add(bar);
        bar.set_message(label.to_string());
        if let Ok(mut bars) = self.bars.lock() {
            bars.insert(id.to_string(), bar);
        }
    }

    fn transfer_inc(&self, id: &str, bytes: u64) {
        if let Ok(bars) = self.bars.lock() {
            if let Some(b) = bars.get(id) {
                b.inc(bytes);
            }
        }
    }

    fn transfer_done(&self, id: &str) {
        if let Ok(mut bars) = self.bars.lock() {
            if let Some(b) = bars.remove(id) {
                b.finish_and_clear();
            }
        }
    }

    fn detail(&self, message: &str) {
        self.line(&format!("      {message}"));
    }
}

/// Formats bytes like the seeds' listings (`150 MB`, `2.0 GB`).
pub fn human_mb(bytes: u64) -> String {
    let mb = bytes as f64 / (1024.0 * 1024.0);
    if mb >= 1024.0 {
        format!("{:.1} GB", mb / 1024.0)
    } else {
        format!("{} MB", mb.round() as u64)
    }
}

/// A borderless table in the seeds' style (`LANGUAGE  SIZE  PATH`).
pub fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING);
    t.set_header(header.iter().map(comfy_table::Cell::new));
    for r in rows {
        t.add_row(r);
    }
    t.to_string()
        .lines()
        .map(|l| l.trim_end().trim_start_matches(' '))
        .collect::<Vec<_>>()
        .join("\n")
}
