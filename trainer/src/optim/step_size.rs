//! Step-size rules for the RK solver (SPEC §3-4): constant, cosine with linear warm-up,
//! the rescaled DAL-p rule h = c / (1 + (c/2)·v^p), and the embedded-pair error controller.
//! These are pure functions of scalars; the solver feeds them the measurements.

use serde::{Deserialize, Serialize};

/// How DALR estimates v = ‖J_f f‖ / ‖f‖ (SPEC §3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DalrEstimator {
    /// One extra gradient evaluation per step at θ_n + ε·f/‖f‖.
    FiniteDifference,
    /// Free: from the previous step's first two stages (lagged by one step). The very first
    /// step has no previous step and falls back to one finite-difference probe.
    Stage,
}

/// Linear warm-up over `warmup` steps to `lr`, then cosine decay to `lr·min_fraction` at `total`.
/// With `warmup = 0` step 0 already runs at `lr`.
pub fn cosine(lr: f64, step: u64, warmup: u64, total: u64, min_fraction: f64) -> f64 {
    if step < warmup {
        return lr * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    let floor = lr * min_fraction;
    floor + (lr - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// The rescaled DAL-p step size of the paper (§3.2): h = c / (1 + (c/2)·v^p).
pub fn dalr(c: f64, p: f64, v: f64) -> f64 {
    c / (1.0 + 0.5 * c * v.powf(p))
}

/// Parameters of the embedded-pair step controller (SPEC §4).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ErrorControl {
    pub atol: f64,
    pub rtol: f64,
    pub safety: f64,
    /// Smallest factor h may shrink by after one attempt.
    pub fmin: f64,
    /// Largest factor h may grow by after an accepted step.
    pub fmax: f64,
    /// h never exceeds this.
    pub h_max: f64,
    /// Rejections of one step before the run stops with an error.
    pub max_rejects: u32,
}

impl Default for ErrorControl {
    fn default() -> Self {
        Self { atol: 1e-4, rtol: 1e-2, safety: 0.9, fmin: 0.2, fmax: 5.0, h_max: 1.0, max_rejects: 20 }
    }
}

impl ErrorControl {
    /// The next h after an attempt with scaled error `err` by a pair whose lower order is `q`:
    /// h·clamp(safety·err^(−1/(q+1)), fmin, fmax), capped at h_max.
    pub fn next_h(&self, h: f64, err: f64, q: u32) -> f64 {
        let factor = if err > 0.0 { self.safety * err.powf(-1.0 / (q as f64 + 1.0)) } else { self.fmax };
        (h * factor.clamp(self.fmin, self.fmax)).min(self.h_max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_warms_up_then_decays() {
        assert!((cosine(1.0, 0, 4, 104, 0.0) - 0.25).abs() < 1e-12);
        assert!((cosine(1.0, 3, 4, 104, 0.0) - 1.0).abs() < 1e-12);
        assert!((cosine(1.0, 4, 4, 104, 0.0) - 1.0).abs() < 1e-12);
        assert!((cosine(1.0, 54, 4, 104, 0.0) - 0.5).abs() < 1e-12);
        assert!(cosine(1.0, 104, 4, 104, 0.1) - 0.1 < 1e-12);
        assert!((cosine(2.0, 0, 0, 10, 0.0) - 2.0).abs() < 1e-12);
    }

    #[test]
    fn dalr_matches_formula() {
        // c = 1, p = 0.8, v = 2: 1/(1 + 0.5·2^0.8)
        assert!((dalr(1.0, 0.8, 2.0) - 1.0 / (1.0 + 0.5 * 2f64.powf(0.8))).abs() < 1e-15);
        // flat landscape: h → c
        assert_eq!(dalr(4.0, 0.8, 0.0), 4.0);
        // very curved: h ≈ 2/v^p
        assert!((dalr(4.0, 1.0, 1e6) - 2.0 / 1e6).abs() < 1e-9);
    }

    #[test]
    fn error_control_shrinks_and_grows() {
        let ec = ErrorControl { h_max: 10.0, ..Default::default() };
        // err = 1 → safety factor; q = 4 (dopri54): 0.9 · 1^(-1/5)
        assert!((ec.next_h(1.0, 1.0, 4) - 0.9).abs() < 1e-12);
        // err = 32, q = 4: 0.9/2
        assert!((ec.next_h(1.0, 32.0, 4) - 0.45).abs() < 1e-12);
        // clamps
        assert!((ec.next_h(1.0, 1e12, 2) - 0.2).abs() < 1e-12);
        assert!((ec.next_h(1.0, 1e-12, 2) - 5.0).abs() < 1e-12);
        assert!((ec.next_h(9.0, 1e-12, 2) - 10.0).abs() < 1e-12);
    }
}
