//! Progress bars on stderr (hidden when stderr is not a terminal or with `--quiet`; then plain
//! log lines stand in for them).

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// How a command reports.
#[derive(Clone, Copy, Debug)]
pub struct Reporter {
    bars: bool,
    quiet: bool,
}

impl Reporter {
    /// Bars when stderr is a terminal and not `quiet`.
    pub fn new(quiet: bool) -> Self {
        Reporter {
            bars: !quiet && std::io::stderr().is_terminal(),
            quiet,
        }
    }

    /// A bar of `len` steps with `msg` (hidden when bars are off).
    pub fn bar(&self, len: u64, msg: String) -> ProgressBar {
        if !self.bars {
            return ProgressBar::hidden();
        }
        let pb = ProgressBar::new(len);
        pb.set_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        pb.set_message(msg);
        pb.enable_steady_tick(Duration::from_millis(200));
        pb
    }

    /// A log line, above any bar, unless quiet.
    pub fn info(&self, pb: Option<&ProgressBar>, line: &str) {
        if self.quiet {
            return;
        }
        match pb {
            Some(pb) if !pb.is_hidden() => pb.println(line),
            _ => eprintln!("{line}"),
        }
    }

    /// A warning: always shown.
    pub fn warn(&self, pb: Option<&ProgressBar>, line: &str) {
        let line = format!("warning: {line}");
        match pb {
            Some(pb) if !pb.is_hidden() => pb.println(line),
            _ => eprintln!("{line}"),
        }
    }
}
