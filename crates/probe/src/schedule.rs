//! When to probe: every `every` steps, plus log-spaced early steps (the papers see most
//! change in the first thousand steps).

use serde::{Deserialize, Serialize};

/// A probing schedule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    /// Probe every this many steps (0: never on this rule).
    pub every: u64,
    /// Also probe at `round(10^(i/per_decade))` for every such step `≤ log_until`.
    pub log_until: u64,
    /// Log-spaced points per decade.
    pub per_decade: u32,
    /// Probe step 0 (the initialisation).
    pub include_zero: bool,
    /// Also probe this step (a run's last, so that its final state is always measured).
    #[serde(default)]
    pub last: Option<u64>,
}

impl Schedule {
    /// The paper's cadence for a 20 000-step run: every 100 steps, 10 points per decade
    /// before step 1000, and the initialisation.
    pub fn paper() -> Self {
        Self {
            every: 100,
            log_until: 1000,
            per_decade: 10,
            include_zero: true,
            last: None,
        }
    }

    /// The same schedule, also probing `step`.
    pub fn with_last(mut self, step: u64) -> Self {
        self.last = Some(step);
        self
    }

    /// No step at all (a run without the probe; [`Schedule::with_last`] still adds one).
    ///
    /// # Example
    /// ```
    /// let s = probe::Schedule::never();
    /// assert!(!(0..10_000).any(|step| s.is_due(step)));
    /// assert!(s.with_last(7).is_due(7));
    /// ```
    pub fn never() -> Self {
        Self {
            include_zero: false,
            ..Self::every(0)
        }
    }

    /// Every `k` steps only.
    pub fn every(k: u64) -> Self {
        Self {
            every: k,
            log_until: 0,
            per_decade: 0,
            include_zero: true,
            last: None,
        }
    }

    /// Whether `step` is probed.
    ///
    /// # Example
    /// ```
    /// let s = probe::Schedule::paper();
    /// assert!(s.is_due(0) && s.is_due(1) && s.is_due(2) && s.is_due(200));
    /// assert!(!s.is_due(150) && s.is_due(158)); // 10^(22/10) ≈ 158.5
    /// ```
    pub fn is_due(&self, step: u64) -> bool {
        if self.last == Some(step) {
            return true;
        }
        if step == 0 {
            return self.include_zero;
        }
        if self.every > 0 && step.is_multiple_of(self.every) {
            return true;
        }
        if self.per_decade > 0 && step <= self.log_until {
            let i = (step as f64).log10() * self.per_decade as f64;
            // The nearest grid exponents round to at most one step each.
            for j in [i.floor(), i.ceil()] {
                if (10f64.powf(j / self.per_decade as f64)).round() as u64 == step {
                    return true;
                }
            }
        }
        false
    }

    /// The probed steps in `0..=last`.
    pub fn steps_up_to(&self, last: u64) -> Vec<u64> {
        (0..=last).filter(|&s| self.is_due(s)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_spaced_steps_are_roughly_geometric() {
        let s = Schedule {
            every: 0,
            log_until: 1000,
            per_decade: 5,
            include_zero: false,
            last: None,
        };
        let steps = s.steps_up_to(2000);
        assert_eq!(
            steps,
            vec![
                1, 2, 3, 4, 6, 10, 16, 25, 40, 63, 100, 158, 251, 398, 631, 1000
            ]
        );
        let e = Schedule::every(50);
        assert_eq!(e.steps_up_to(120), vec![0, 50, 100]);
    }
}
