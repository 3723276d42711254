//! Wall time spent in each fused op on the CPU, by label, for finding where a step's time goes:
//! off by default; `ATOMTUNE_OP_TIMES=1` (or [`set_enabled`]) turns it on, [`report`] gives the
//! table (the `sd15` bench prints it to stderr after its timed steps). A backward's time holds
//! the op it runs for its gradients.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use crate::cpu::switch::Switch;

/// The environment variable that turns the timing on (`1`); off by default.
pub const VAR: &str = "ATOMTUNE_OP_TIMES";

static SWITCH: Switch = Switch::new(VAR, false, "op times");

/// Calls and seconds by label.
static TIMES: Mutex<BTreeMap<String, (u64, f64)>> = Mutex::new(BTreeMap::new());

/// Turns the timing on or off for the whole process.
pub fn set_enabled(on: bool) {
    SWITCH.set(on);
}

/// Adds its lifetime to its label's total when dropped.
pub(crate) struct Timer(String, Instant);

/// A timer for the op `label` names (formed only when timing is on), `None` when it is off.
pub(crate) fn start(label: impl FnOnce() -> String) -> Option<Timer> {
    SWITCH.on().then(|| Timer(label(), Instant::now()))
}

impl Drop for Timer {
    fn drop(&mut self) {
        let dt = self.1.elapsed().as_secs_f64();
        let mut times = TIMES.lock().unwrap_or_else(|e| e.into_inner());
        let e = times.entry(std::mem::take(&mut self.0)).or_default();
        *e = (e.0 + 1, e.1 + dt);
    }
}

/// Forgets what was timed so far (after a warm-up step).
pub fn reset() {
    TIMES.lock().unwrap_or_else(|e| e.into_inner()).clear();
}

/// One line per label, the most time first: calls and seconds since the last [`reset`].
pub fn report() -> String {
    let times = TIMES.lock().unwrap_or_else(|e| e.into_inner());
    let mut rows: Vec<_> = times.iter().collect();
    rows.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1));
    rows.iter()
        .map(|(label, (n, s))| format!("{label:44} {n:6} calls {s:9.3} s\n"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_only_when_on_and_sums_by_label() {
        set_enabled(false);
        assert!(start(|| unreachable!("no label is formed while off")).is_none());
        set_enabled(true);
        for _ in 0..2 {
            let _t = start(|| "op-times-test".to_string());
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        set_enabled(false);
        let line = report()
            .lines()
            .find(|l| l.starts_with("op-times-test"))
            .map(str::to_string)
            .expect("the label is reported");
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(f[1], "2");
        assert!(f[3].parse::<f64>().unwrap() >= 0.01, "{line}");
    }
}
