//! Run metrics: `<out>/metrics.jsonl` (one JSON object per line, each with a `step`) and the
//! terminal progress display.
//!
//! [`MetricsWriter::open`] with the step a run starts from keeps only the lines of earlier steps,
//! so a resumed run continues the curve without duplicates (and a fresh run, step 0, starts an
//! empty file). Every record is written with one `write` call and flushed.
//!
//! [`Progress`] is an indicatif bar (step/total, loss, lr, tokens/s) on a terminal, and a log
//! line through `tracing` every `log_every` steps when stderr is not a terminal or `CI` is set.

use std::fs::{self, File, OpenOptions};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::checkpoint::write_atomic;

/// File name of the metrics log inside the run folder.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// Errors from the metrics log.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// A filesystem operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// Rewriting the kept lines on open failed.
    #[error(transparent)]
    Rewrite(#[from] crate::checkpoint::CheckpointError),
    /// A record did not serialise to a JSON object.
    #[error("metrics record: {0}")]
    Record(String),
}

/// Appends one JSON object per line to `<out>/metrics.jsonl`.
#[derive(Debug)]
pub struct MetricsWriter {
    path: PathBuf,
    file: File,
}

/// The `step` of a metrics line, or `None` for a line that is not a JSON object with one
/// (a line torn by a crash, for instance).
fn line_step(line: &str) -> Option<u64> {
    serde_json::from_str::<serde_json::Value>(line)
        .ok()?
        .get("step")?
        .as_u64()
}

impl MetricsWriter {
    /// Opens `<out_dir>/metrics.jsonl` for a run that starts at optimizer step `start_step`:
    /// lines with `step >= start_step` (and lines without a readable step) are dropped first, so
    /// `start_step = 0` starts an empty file and a resume at step N keeps steps `< N`.
    pub fn open(out_dir: impl AsRef<Path>, start_step: u64) -> Result<Self, MetricsError> {
        let out_dir = out_dir.as_ref();
        let io = |op, path: &Path| {
            let path = path.to_path_buf();
            move |source| MetricsError::Io { op, path, source }
        };
        fs::create_dir_all(out_dir).map_err(io("create", out_dir))?;
        let path = out_dir.join(METRICS_FILE);
        let kept = match fs::read_to_string(&path) {
            Ok(text) => text
                .lines()
                .filter(|l| line_step(l).is_some_and(|s| s < start_step))
                .flat_map(|l| [l, "\n"])
                .collect::<String>(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io("read", &path)(e)),
        };
        write_atomic(&path, kept.as_bytes())?;
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io("open", &path))?;
        Ok(Self { path, file })
    }

    /// The metrics file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `record` (a struct or map with a `step` field) as one line and flushes it.
    pub fn write(&mut self, record: &impl Serialize) -> Result<(), MetricsError> {
        let value =
            serde_json::to_value(record).map_err(|e| MetricsError::Record(e.to_string()))?;
        if !value.is_object() {
            return Err(MetricsError::Record(format!(
                "expected a JSON object, got {value}"
            )));
        }
        let mut line = value.to_string();
        line.push('\n');
        let io = |op| {
            let path = self.path.clone();
            move |source| MetricsError::Io { op, path, source }
        };
        self.file
            .write_all(line.as_bytes())
            .map_err(io("append to"))?;
        self.file.flush().map_err(io("flush"))
    }
}

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// An indicatif bar on stderr.
    Bar,
    /// A `tracing` info line every `log_every` steps.
    Log,
}

impl ProgressMode {
    /// `Bar` when stderr is a terminal and `CI` is not set, else `Log`.
    pub fn detect() -> Self {
        if std::io::stderr().is_terminal() && std::env::var_os("CI").is_none() {
            ProgressMode::Bar
        } else {
            ProgressMode::Log
        }
    }
}

/// What one optimizer step reports to [`Progress::update`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// Optimizer steps completed (1 after the first step).
    pub step: u64,
    /// Mean loss of the step.
    pub loss: f32,
    /// Learning rate the step used.
    pub lr: f32,
    /// Tokens processed per second over the step.
    pub tokens_per_s: f64,
}

impl StepReport {
    fn line(&self, total: u64) -> String {
        format!(
            "step {}/{} loss {:.4} lr {:.3e} tok/s {:.0}",
            self.step, total, self.loss, self.lr, self.tokens_per_s
        )
    }
}

/// Training progress on the terminal: a bar, or periodic log lines.
#[derive(Debug)]
pub struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    log_every: u64,
}

impl Progress {
    /// Progress over `total` steps starting after `start_step` completed ones, refreshed (or
    /// logged) every `log_every` steps (0 = never), in the mode [`ProgressMode::detect`] picks.
    pub fn new(total: u64, start_step: u64, log_every: u64) -> Self {
        Self::with_mode(ProgressMode::detect(), total, start_step, log_every)
    }

    /// As [`Progress::new`] with an explicit mode.
    pub fn with_mode(mode: ProgressMode, total: u64, start_step: u64, log_every: u64) -> Self {
        let bar = (mode == ProgressMode::Bar).then(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(
                "{bar:30} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]",
            )
            .expect("the progress template is valid");
            bar.set_style(style);
            bar.set_position(start_step);
            bar.enable_steady_tick(Duration::from_millis(250));
            bar
        });
        Self {
            bar,
            total,
            log_every,
        }
    }

    /// Reports a completed step: refreshes the bar, or logs a line every `log_every` steps and
    /// at the last step.
    pub fn update(&self, report: &StepReport) {
        let due = self.log_every > 0
            && (report.step.is_multiple_of(self.log_every) || report.step == self.total);
        match &self.bar {
            Some(bar) => {
                bar.set_position(report.step);
                if due {
                    bar.set_message(format!(
                        "loss {:.4} lr {:.3e} tok/s {:.0}",
                        report.loss, report.lr, report.tokens_per_s
                    ));
                }
            }
            None if due => tracing::info!("{}", report.line(self.total)),
            None => {}
        }
    }

    /// Prints a message without breaking the bar (through `tracing` in log mode).
    pub fn println(&self, msg: impl AsRef<str>) {
        match &self.bar {
            Some(bar) => bar.println(msg.as_ref()),
            None => tracing::info!("{}", msg.as_ref()),
        }
    }

    /// Leaves the bar drawn in its final state.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            if !bar.is_finished() {
                bar.abandon();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn steps(path: &Path) -> Vec<u64> {
        fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| line_step(l).unwrap())
            .collect()
    }

    #[test]
    fn writes_one_object_per_line() {
        let out = tempfile::tempdir().unwrap();
        let mut w = MetricsWriter::open(out.path(), 0).unwrap();
        w.write(&json!({"step": 1, "loss": 2.5})).unwrap();
        w.write(&json!({"step": 2, "loss": 2.0})).unwrap();
        assert!(w.write(&json!([1, 2])).is_err());
        let text = fs::read_to_string(w.path()).unwrap();
        assert_eq!(
            text,
            "{\"loss\":2.5,\"step\":1}\n{\"loss\":2.0,\"step\":2}\n"
        );
    }

    #[test]
    fn resume_truncates_steps_at_or_after_the_resume_step() {
        let out = tempfile::tempdir().unwrap();
        let mut w = MetricsWriter::open(out.path(), 0).unwrap();
        for step in 1..=8 {
            w.write(&json!({"step": step, "loss": 1.0})).unwrap();
        }
        drop(w);
        // A torn last line, as a crash mid-write would leave.
        let path = out.path().join(METRICS_FILE);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"step\": 9, \"lo").unwrap();
        drop(f);

        // Resume from the checkpoint after step 5: the next record is step 6.
        let mut w = MetricsWriter::open(out.path(), 6).unwrap();
        assert_eq!(steps(&path), vec![1, 2, 3, 4, 5]);
        w.write(&json!({"step": 6, "loss": 0.5})).unwrap();
        assert_eq!(steps(&path), vec![1, 2, 3, 4, 5, 6]);

        // A fresh run (start 0) empties the file.
        MetricsWriter::open(out.path(), 0).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "");
    }

    #[test]
    fn progress_log_mode_does_not_panic() {
        let p = Progress::with_mode(ProgressMode::Log, 3, 0, 2);
        for step in 1..=3 {
            p.update(&StepReport {
                step,
                loss: 1.0,
                lr: 1e-3,
                tokens_per_s: 100.0,
            });
        }
        p.println("done");
        p.finish();
        let r = StepReport {
            step: 2,
            loss: 1.5,
            lr: 3e-4,
            tokens_per_s: 1234.4,
        };
        assert_eq!(r.line(10), "step 2/10 loss 1.5000 lr 3.000e-4 tok/s 1234");
        let bar = Progress::with_mode(ProgressMode::Bar, 3, 1, 1);
        bar.update(&r);
        bar.finish();
    }
}
