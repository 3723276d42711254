//! A process-wide on/off switch that a program sets, or else an environment variable decides
//! once (the bf16 products' `ATOMTUNE_CPU_BF16`, Winograd's `ATOMTUNE_WINOGRAD`).

use std::sync::atomic::{AtomicU8, Ordering};

/// A switch: `1` or `0` in its variable turns it on or off; unset, it takes its default;
/// anything else is a warning and the default.
pub(crate) struct Switch {
    var: &'static str,
    default: bool,
    /// What it does, for the warning ("bf16 products").
    what: &'static str,
    /// 0: not decided yet (the environment decides), 1: off, 2: on.
    state: AtomicU8,
}

impl Switch {
    /// A switch read from `var`, `default` where it is unset.
    pub(crate) const fn new(var: &'static str, default: bool, what: &'static str) -> Switch {
        Switch {
            var,
            default,
            what,
            state: AtomicU8::new(0),
        }
    }

    /// Turns it on or off for the whole process.
    pub(crate) fn set(&self, on: bool) {
        self.state.store(if on { 2 } else { 1 }, Ordering::Relaxed);
    }

    /// Whether it is on: as set, else as the environment says.
    pub(crate) fn on(&self) -> bool {
        match self.state.load(Ordering::Relaxed) {
            0 => {
                let on = match std::env::var(self.var).as_deref() {
                    Ok("1") => true,
                    Ok("0") => false,
                    Err(_) => self.default,
                    Ok(other) => {
                        let (var, what) = (self.var, self.what);
                        let state = if self.default { "on" } else { "off" };
                        eprintln!(
                            "warning: {var}={other:?} is neither 1 nor 0; {what} stay {state}"
                        );
                        self.default
                    }
                };
                // a racing set wins
                let new = if on { 2 } else { 1 };
                let _ = self
                    .state
                    .compare_exchange(0, new, Ordering::Relaxed, Ordering::Relaxed);
                self.state.load(Ordering::Relaxed) == 2
            }
            s => s == 2,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_decides_until_the_program_does() {
        // variables no one sets: their defaults
        let off = Switch::new("ATOMTUNE_TEST_SWITCH_UNSET_A", false, "tests");
        let on = Switch::new("ATOMTUNE_TEST_SWITCH_UNSET_B", true, "tests");
        assert!(!off.on() && on.on());
        off.set(true);
        on.set(false);
        assert!(off.on() && !on.on());
        // set from the environment: 1, 0, and anything else as the default
        for (value, default, want) in [("1", false, true), ("0", true, false), ("yes", true, true)]
        {
            let var = match value {
                "1" => "ATOMTUNE_TEST_SWITCH_ONE",
                "0" => "ATOMTUNE_TEST_SWITCH_ZERO",
                _ => "ATOMTUNE_TEST_SWITCH_OTHER",
            };
            std::env::set_var(var, value);
            assert_eq!(
                Switch::new(var, default, "tests").on(),
                want,
                "{var}={value}"
            );
        }
    }
}
