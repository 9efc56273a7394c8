//! The only place that writes to the terminal. Library code reports on stderr through
//! [`Reporter`] (indicatif bars on a TTY, plain lines otherwise; `--quiet` keeps only warnings and
//! errors); commands return report structs that [`print`] renders on stdout as text or JSON.

use std::io::{self, IsTerminal, Write};
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How long-running work tells the user what it is doing.
pub trait Reporter: Send + Sync {
    /// Something the user should know now (waiting for a lock, resuming a download).
    fn info(&self, msg: &str);
    /// Something that went wrong but did not stop the work (a retry, a fallback).
    fn warn(&self, msg: &str);
    /// One item of several failed (the command goes on with the others); shown even with
    /// `--quiet`.
    fn error(&self, msg: &str) {
        self.warn(msg);
    }
    /// Detail for `-v`.
    fn debug(&self, msg: &str);
    /// More detail for `-vv` (every HTTP request and its answer).
    fn trace(&self, _msg: &str) {}
    /// A progress display for one transfer or step.
    fn transfer(&self, label: &str) -> Box<dyn Transfer>;
    /// The labels of the transfers to come, in the order their bars are shown (the order the
    /// user gave the images), whichever starts first.
    fn expect(&self, _labels: &[String]) {}
    /// A result line on stdout, written as soon as it is known (between progress bars, which
    /// are not torn). A closed stdout is ignored here; the command's exit tells the rest.
    fn output(&self, line: &str) {
        let _ = writeln!(io::stdout().lock(), "{line}");
    }
}

/// Progress of one image.
pub trait Transfer: Send {
    /// Says what stage the work is at (downloading, inspecting, converting).
    fn stage(&self, stage: &str);
    /// Sets the total byte count, when known.
    fn set_length(&self, len: Option<u64>);
    /// Sets the bytes done so far.
    fn set_position(&self, pos: u64);
}

/// Reports nothing: for library callers and tests.
pub struct Silent;

impl Reporter for Silent {
    fn info(&self, _: &str) {}
    fn warn(&self, _: &str) {}
    fn debug(&self, _: &str) {}
    fn transfer(&self, _: &str) -> Box<dyn Transfer> {
        Box::new(NoBar)
    }
}

struct NoBar;

impl Transfer for NoBar {
    fn stage(&self, _: &str) {}
    fn set_length(&self, _: Option<u64>) {}
    fn set_position(&self, _: u64) {}
}

/// Reports to stderr: bars on a TTY (never under `--quiet`), lines otherwise.
pub struct Terminal {
    multi: Option<MultiProgress>,
    quiet: bool,
    verbose: u8,
    /// Labels in the order their bars are shown ([`Reporter::expect`]).
    order: std::sync::Mutex<Vec<String>>,
    /// The ranks (positions in `order`) of the bars on screen, top to bottom.
    shown: Shown,
}

/// The ranks of the bars on screen, top to bottom, shared with each bar.
type Shown = std::sync::Arc<std::sync::Mutex<Vec<usize>>>;

impl Terminal {
    /// `quiet` keeps only warnings; `verbose` ≥ 1 shows debug lines.
    pub fn new(quiet: bool, verbose: u8) -> Terminal {
        let bars = !quiet && std::io::stderr().is_terminal();
        Terminal {
            multi: bars.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
            quiet,
            verbose,
            order: std::sync::Mutex::new(Vec::new()),
            shown: std::sync::Arc::new(std::sync::Mutex::new(Vec::new())),
        }
    }

    fn line(&self, text: &str) {
        match &self.multi {
            Some(m) => m.suspend(|| eprintln!("{text}")),
            None => eprintln!("{text}"),
        }
    }
}

impl Reporter for Terminal {
    fn info(&self, msg: &str) {
        if !self.quiet {
            self.line(&format!("imgcache: {msg}"));
        }
    }

    fn warn(&self, msg: &str) {
        self.line(&format!("imgcache: warning: {msg}"));
    }

    fn error(&self, msg: &str) {
        self.line(&format!("imgcache: {msg}"));
    }

    fn debug(&self, msg: &str) {
        if self.verbose > 0 && !self.quiet {
            self.line(&format!("imgcache: {msg}"));
        }
    }

    fn trace(&self, msg: &str) {
        if self.verbose > 1 && !self.quiet {
            self.line(&format!("imgcache: {msg}"));
        }
    }

    fn output(&self, line: &str) {
        let write = || {
            let mut out = io::stdout().lock();
            let _ = writeln!(out, "{line}").and_then(|()| out.flush());
        };
        match &self.multi {
            Some(m) => m.suspend(write),
            None => write(),
        }
    }

    fn expect(&self, labels: &[String]) {
        if let Ok(mut order) = self.order.lock() {
            *order = labels.to_vec();
        }
    }

    fn transfer(&self, label: &str) -> Box<dyn Transfer> {
        let Some(multi) = &self.multi else {
            return Box::new(NoBar);
        };
        // The second image's bar goes below the first's even if it started first.
        let rank = self
            .order
            .lock()
            .ok()
            .and_then(|o| o.iter().position(|l| l == label))
            .unwrap_or(usize::MAX);
        let bar = match self.shown.lock() {
            Ok(mut shown) => {
                let at = shown.iter().filter(|r| **r <= rank).count();
                shown.insert(at, rank);
                multi.insert(at, ProgressBar::no_length())
            }
            Err(_) => multi.add(ProgressBar::no_length()),
        };
        bar.set_style(style(Shape::Spinner));
        bar.set_prefix(short_label(label));
        bar.enable_steady_tick(Duration::from_millis(200));
        Box::new(Bar {
            bar,
            multi: Some((multi.clone(), self.shown.clone(), rank)),
        })
    }
}

/// Labels are image ids: the first 13 characters and an ellipsis keep a bar within 80 columns.
fn short_label(label: &str) -> String {
    if label.chars().count() <= 14 {
        return label.to_owned();
    }
    let mut s: String = label.chars().take(13).collect();
    s.push('…');
    s
}

#[derive(Clone, Copy)]
enum Shape {
    /// Bytes against a known total.
    Bar,
    /// Bytes without a total, or a stage that moves no bytes (converting, waiting for a
    /// lock): a spinner with the time spent.
    Spinner,
}

fn style(shape: Shape) -> ProgressStyle {
    // One unit system everywhere: binary (MiB, MiB/s), as `-v` prints it too. The bar takes
    // what is left of the terminal's width, so a line never wraps in 80 columns.
    let template = match shape {
        Shape::Bar => {
            "{prefix:14} {msg:11} [{wide_bar}] {binary_bytes:>9}/{binary_total_bytes:<9} {binary_bytes_per_sec:>11}"
        }
        Shape::Spinner => "{prefix:14} {msg} {spinner} {elapsed} {binary_bytes:>9}",
    };
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

struct Bar {
    bar: ProgressBar,
    /// Where it is shown, to leave that place when done.
    multi: Option<(MultiProgress, Shown, usize)>,
}

impl Transfer for Bar {
    fn stage(&self, stage: &str) {
        // Only the download moves bytes the bar can show; later stages get a spinner and
        // their own clock instead of a bar frozen at 100 %.
        if stage != "downloading" && self.bar.length().is_some() {
            self.bar.set_style(style(Shape::Spinner));
            self.bar.reset_elapsed();
        }
        self.bar.set_message(stage.to_owned());
    }

    fn set_length(&self, len: Option<u64>) {
        match len {
            Some(n) => {
                self.bar.set_style(style(Shape::Bar));
                self.bar.set_length(n);
            }
            None => self.bar.unset_length(),
        }
    }

    fn set_position(&self, pos: u64) {
        self.bar.set_position(pos);
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
        if let Some((multi, shown, rank)) = self.multi.take() {
            multi.remove(&self.bar);
            if let Ok(mut shown) = shown.lock()
                && let Some(at) = shown.iter().position(|r| *r == rank)
            {
                shown.remove(at);
            }
        }
    }
}

/// A command's result as it is shown: `--json` prints its serde form, otherwise [`Render::text`].
pub trait Render: serde::Serialize {
    /// The text form, for people.
    fn text(&self, out: &mut dyn Write) -> io::Result<()>;
}

/// Writes a report on stdout, as pretty JSON plus a newline or as its text; flushes. A closed
/// pipe is not an error (see [`quiet_on_broken_pipe`]).
pub fn print<R: Render>(report: &R, json: bool) -> io::Result<()> {
    let stdout = io::stdout();
    let mut out = stdout.lock();
    quiet_on_broken_pipe((|| {
        if json {
            serde_json::to_writer_pretty(&mut out, report).map_err(io::Error::from)?;
            writeln!(out)?;
        } else {
            report.text(&mut out)?;
        }
        out.flush()
    })())
}

/// Writes bytes made elsewhere (a man page, a completion script) on stdout; a closed pipe is
/// not an error.
pub fn print_bytes(bytes: &[u8]) -> io::Result<()> {
    let stdout = io::stdout();
    let mut out = stdout.lock();
    quiet_on_broken_pipe(out.write_all(bytes).and_then(|()| out.flush()))
}

/// A reader that went away (`imgcache list | head -1`) saw what it wanted: the rest of the
/// output is dropped and the command ends with the exit code of its work, not an error — as
/// ripgrep does. (Rust ignores SIGPIPE, so the write fails with EPIPE instead of killing us.)
fn quiet_on_broken_pipe(r: io::Result<()>) -> io::Result<()> {
    match r {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

/// A string someone else chose (an image name, a property) as it may be shown on a terminal:
/// control characters escaped (`\u{1b}`), so a name cannot move the cursor, clear the screen or
/// forge a line.
pub fn printable(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let shown: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            shown
        })
        .collect()
}
