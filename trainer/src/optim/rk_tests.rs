//! Tests of the RK step against closed-form gradient flows and hand-computed values (SPEC §2-4).

use super::*;
use crate::field::DiagonalQuadratic;
use crate::scalar::norm;

fn quad() -> DiagonalQuadratic {
    DiagonalQuadratic::new(vec![0.5, 1.0, 2.0])
}
const THETA0: [f64; 3] = [1.0, -1.0, 0.5];

fn solver<F: Scalar>(tableau: &str, step_size: StepSize) -> RkSolver<F> {
    let mut o = RkOptions::plain(Tableau::builtin(tableau).unwrap(), 0.1);
    o.step_size = step_size;
    RkSolver::new(o).unwrap()
}

fn one_step_error(
    tableau: &str,
    field: &mut dyn VectorField<f64>,
    exact: &dyn Fn(f64) -> Vec<f64>,
    theta0: &[f64],
    h: f64,
) -> f64 {
    let mut s = solver::<f64>(tableau, StepSize::Constant { lr: h });
    let mut th = theta0.to_vec();
    s.step(0, &mut th, field).unwrap();
    let ex = exact(h);
    th.iter().zip(&ex).map(|(a, b)| (a - b).powi(2)).sum::<f64>().sqrt()
}

/// Least-squares slope of log(err) against log(h).
fn slope(hs: &[f64], errs: &[f64]) -> f64 {
    let xs: Vec<f64> = hs.iter().map(|h| h.ln()).collect();
    let ys: Vec<f64> = errs.iter().map(|e| e.ln()).collect();
    let n = xs.len() as f64;
    let (mx, my) = (xs.iter().sum::<f64>() / n, ys.iter().sum::<f64>() / n);
    let num: f64 = xs.iter().zip(&ys).map(|(x, y)| (x - mx) * (y - my)).sum();
    let den: f64 = xs.iter().map(|x| (x - mx).powi(2)).sum();
    num / den
}

#[test]
fn measured_order_on_quadratic_matches_tableau_order() {
    // Local error of an order-p method is O(h^(p+1)); measured on the exact linear flow
    // θ(t) = exp(−tH)θ_0, in f64 so that dopri54's h^6 stays above rounding.
    let hs = [0.2, 0.1, 0.05, 0.025];
    for name in Tableau::builtin_names() {
        let p = Tableau::builtin(name).unwrap().order() as f64;
        let q = quad();
        let errs: Vec<f64> =
            hs.iter().map(|&h| one_step_error(name, &mut quad(), &|t| q.exact_flow(&THETA0, t), &THETA0, h)).collect();
        let s = slope(&hs, &errs);
        assert!(
            (s - (p + 1.0)).abs() < 0.3,
            "{name}: local error slope {s:.2}, expected {} (errors {errs:?})",
            p + 1.0
        );
    }
}

/// dθ/dt = −θ², the gradient flow of L(θ) = θ³/3: nonlinear, exact solution θ0/(1 + θ0 t).
struct Cubic;
impl VectorField<f64> for Cubic {
    fn dim(&self) -> usize {
        1
    }
    fn eval(&mut self, theta: &[f64], grad: &mut [f64]) -> Result<f64> {
        grad[0] = theta[0] * theta[0];
        Ok(theta[0].powi(3) / 3.0)
    }
}

#[test]
fn measured_order_on_nonlinear_flow() {
    let hs = [0.1, 0.05, 0.025, 0.0125];
    for name in Tableau::builtin_names() {
        let p = Tableau::builtin(name).unwrap().order() as f64;
        let errs: Vec<f64> =
            hs.iter().map(|&h| one_step_error(name, &mut Cubic, &|t| vec![1.0 / (1.0 + t)], &[1.0], h)).collect();
        // The leading error term can nearly cancel on this ODE (rk38), so use the slope between
        // the two smallest steps, well inside the asymptotic range.
        let s = slope(&hs[2..], &errs[2..]);
        assert!(s > p + 1.0 - 0.3, "{name}: local error slope {s:.2} on θ' = −θ², expected ≥ {}", p + 1.0);
    }
}

#[test]
fn euler_is_gradient_descent() {
    let mut s = solver::<f64>("euler", StepSize::Constant { lr: 0.1 });
    let mut th = THETA0.to_vec();
    let mut f = quad();
    let r = s.step(0, &mut th, &mut f).unwrap();
    for i in 0..3 {
        assert_eq!(th[i], THETA0[i] - 0.1 * (f.lambda[i] * THETA0[i]));
    }
    assert_eq!(r.grad_evals, 1);
    assert_eq!(f.evals, 1);
}

#[test]
fn rk4_by_hand_on_a_scalar() {
    // θ' = −λθ with λ = 2, h = 0.1: RK4 multiplies by 1 − z + z²/2 − z³/6 + z⁴/24, z = hλ.
    let mut f = DiagonalQuadratic::new(vec![2.0]);
    let mut s = solver::<f64>("rk4", StepSize::Constant { lr: 0.1 });
    let mut th = vec![1.5];
    let r = s.step(0, &mut th, &mut f).unwrap();
    let z: f64 = 0.2;
    let expect = 1.5 * (1.0 - z + z * z / 2.0 - z.powi(3) / 6.0 + z.powi(4) / 24.0);
    assert!((th[0] - expect).abs() < 1e-15, "{} vs {expect}", th[0]);
    assert_eq!(r.grad_evals, 4);
    assert_eq!(r.loss, 0.5 * 2.0 * 1.5 * 1.5);
}

fn full_options(tableau: &str, streaming: bool) -> RkOptions {
    RkOptions {
        tableau: Tableau::builtin(tableau).unwrap(),
        preconditioner: Preconditioner::ModifiedAdagrad,
        step_size: StepSize::Constant { lr: 0.3 },
        momentum: 0.9,
        streaming,
        nonfinite_retries: 4,
    }
}

#[test]
fn streaming_and_resident_are_bit_identical() {
    for name in ["rk4", "rk38", "dopri54", "bs32", "kutta3"] {
        let mut thetas = Vec::new();
        let mut peaks = Vec::new();
        for streaming in [true, false] {
            let mut s = RkSolver::<f32>::new(full_options(name, streaming)).unwrap();
            let mut th: Vec<f32> = (0..50).map(|i| ((i as f32) * 0.37).sin()).collect();
            let mut f = DiagonalQuadratic::new((0..50).map(|i| 0.1 + i as f64 * 0.05).collect());
            for n in 0..5 {
                s.step(n, &mut th, &mut f).unwrap();
            }
            thetas.push(th);
            peaks.push(s.peak_live_stage_buffers);
        }
        assert_eq!(thetas[0], thetas[1], "{name}: streaming and resident differ");
        let t = Tableau::builtin(name).unwrap();
        assert_eq!(peaks[1], t.stages() - 1, "{name}: resident keeps k_2..k_s");
        assert!(
            peaks[0] <= t.streaming_stage_buffers(),
            "{name}: streaming peak {} > liveness bound {}",
            peaks[0],
            t.streaming_stage_buffers()
        );
    }
    // Classical RK4 needs a single stage buffer when streaming (besides the pinned k_1).
    let mut s = RkSolver::<f32>::new(full_options("rk4", true)).unwrap();
    let mut th = vec![1.0f32; 4];
    s.step(0, &mut th, &mut DiagonalQuadratic::new(vec![1.0; 4])).unwrap();
    assert_eq!(s.peak_live_stage_buffers, 1);
}

#[test]
fn modified_adagrad_step_by_hand() {
    // Euler + modified AdaGrad: G_1 = g², θ_1 = θ_0 − h g / sqrt(1 + g²); then G_2 = G_1 + g_1².
    let mut o = RkOptions::plain(Tableau::builtin("euler").unwrap(), 0.5);
    o.preconditioner = Preconditioner::ModifiedAdagrad;
    let mut s = RkSolver::<f64>::new(o).unwrap();
    let mut f = quad();
    let mut th = THETA0.to_vec();
    s.step(0, &mut th, &mut f).unwrap();
    let g0: Vec<f64> = (0..3).map(|i| f.lambda[i] * THETA0[i]).collect();
    let th1: Vec<f64> = (0..3).map(|i| THETA0[i] - 0.5 * g0[i] / (1.0 + g0[i] * g0[i]).sqrt()).collect();
    for i in 0..3 {
        assert!((th[i] - th1[i]).abs() < 1e-15);
    }
    s.step(1, &mut th, &mut f).unwrap();
    for i in 0..3 {
        let g1 = f.lambda[i] * th1[i];
        let expect = th1[i] - 0.5 * g1 / (1.0 + g0[i] * g0[i] + g1 * g1).sqrt();
        assert!((th[i] - expect).abs() < 1e-15);
    }
    let st = s.state().unwrap();
    assert_eq!(st.buffer("rk.G").unwrap().len(), 3);
}

#[test]
fn adagrad_uses_its_epsilon_and_fixes_d_for_the_whole_step() {
    // Heun with D fixed from k_1: θ_2 = θ − h D k_1, θ' = θ − h D (k_1 + k_2)/2.
    let eps = 1e-3;
    let mut o = RkOptions::plain(Tableau::builtin("heun").unwrap(), 0.2);
    o.preconditioner = Preconditioner::Adagrad { eps };
    let mut s = RkSolver::<f64>::new(o).unwrap();
    let mut f = DiagonalQuadratic::new(vec![3.0]);
    let mut th = vec![0.7];
    s.step(0, &mut th, &mut f).unwrap();
    let k1 = 3.0 * 0.7;
    let d = 1.0 / (eps + k1 * k1).sqrt();
    let k2 = 3.0 * (0.7 - 0.2 * d * k1);
    let expect = 0.7 - 0.2 * d * (0.5 * k1 + 0.5 * k2);
    assert!((th[0] - expect).abs() < 1e-15, "{} vs {expect}", th[0]);
}

#[test]
fn momentum_on_the_rk_gradient_by_hand() {
    let beta = 0.95;
    let mut o = RkOptions::plain(Tableau::builtin("midpoint").unwrap(), 0.1);
    o.momentum = beta;
    let mut s = RkSolver::<f64>::new(o).unwrap();
    let mut f = DiagonalQuadratic::new(vec![2.0]);
    let mut th = vec![1.0];
    // midpoint: g* = g(θ − h/2 g(θ))
    let gstar = |x: f64| 2.0 * (x - 0.05 * 2.0 * x);
    s.step(0, &mut th, &mut f).unwrap();
    let m1 = gstar(1.0);
    let th1 = 1.0 - 0.1 * m1;
    assert!((th[0] - th1).abs() < 1e-15);
    s.step(1, &mut th, &mut f).unwrap();
    let m2 = beta * m1 + gstar(th1);
    assert!((th[0] - (th1 - 0.1 * m2)).abs() < 1e-15);
}

#[test]
fn dalr_finite_difference_is_exact_on_a_quadratic() {
    // For L = ½θᵀHθ and D = I, v = ‖Hg‖/‖g‖ and the probe is exact up to rounding.
    let (c, p) = (1.0, 0.8);
    let mut s = solver::<f64>("rk4", StepSize::Dalr { c, p, estimator: DalrEstimator::FiniteDifference, fd_eps: 1e-3 });
    let mut f = quad();
    let mut th = THETA0.to_vec();
    let r = s.step(0, &mut th, &mut f).unwrap();
    let g: Vec<f64> = (0..3).map(|i| f.lambda[i] * THETA0[i]).collect();
    let hg: Vec<f64> = (0..3).map(|i| f.lambda[i] * g[i]).collect();
    let v = norm(&hg) / norm(&g);
    assert!((r.dalr_v.unwrap() - v).abs() < 1e-9, "{:?} vs {v}", r.dalr_v);
    assert!((r.h - c / (1.0 + c / 2.0 * v.powf(p))).abs() < 1e-9);
    assert_eq!(r.grad_evals, 5, "4 stages + 1 probe");
}

#[test]
fn dalr_stage_estimator_uses_the_previous_steps_stages() {
    let (c, p) = (2.0, 0.8);
    let mut s = solver::<f64>("rk4", StepSize::Dalr { c, p, estimator: DalrEstimator::Stage, fd_eps: 1e-3 });
    let mut f = quad();
    let mut th = THETA0.to_vec();
    let r0 = s.step(0, &mut th, &mut f).unwrap();
    assert_eq!(r0.grad_evals, 5, "the first step has no previous stages: one probe");
    // On a quadratic k_2 − k_1 = −h a21 H k_1 exactly, so the lagged estimate is ‖H k_1‖/‖k_1‖
    // of the previous step.
    let g0: Vec<f64> = (0..3).map(|i| f.lambda[i] * THETA0[i]).collect();
    let hg0: Vec<f64> = (0..3).map(|i| f.lambda[i] * g0[i]).collect();
    let r1 = s.step(1, &mut th, &mut f).unwrap();
    assert_eq!(r1.grad_evals, 4, "the stage estimator is free");
    assert!((r1.dalr_v.unwrap() - norm(&hg0) / norm(&g0)).abs() < 1e-12);
    // Rejected when a_21 = 0.
    let mut o = RkOptions::plain(Tableau::builtin("euler").unwrap(), 0.1);
    o.step_size = StepSize::Dalr { c, p, estimator: DalrEstimator::Stage, fd_eps: 1e-3 };
    assert!(RkSolver::<f64>::new(o).is_err());
}

#[test]
fn error_control_rejects_and_adapts() {
    let control = ErrorControl { atol: 1e-6, rtol: 1e-6, h_max: 0.5, ..Default::default() };
    let mut s = solver::<f64>("dopri54", StepSize::ErrorControlled { h0: 0.5, control });
    let mut f = DiagonalQuadratic::new(vec![1.0, 30.0]);
    let mut th = vec![1.0, 1.0];
    let r = s.step(0, &mut th, &mut f).unwrap();
    assert!(r.rejected > 0, "h0 = 0.5 with λ = 30 must be rejected at rtol 1e-6");
    assert!(r.error_estimate.unwrap() <= 1.0);
    assert_eq!(r.grad_evals, 1 + 6 * (r.rejected as u64 + 1), "k_1 is reused by every attempt");
    assert!(r.h < 0.5);
    // The accepted step follows the exact flow to within the tolerance scale.
    let ex = f.exact_flow(&[1.0, 1.0], r.h);
    assert!((th[0] - ex[0]).abs() < 1e-4 && (th[1] - ex[1]).abs() < 1e-4);
    // Later steps: h never exceeds h_max.
    for n in 1..30 {
        let r = s.step(n, &mut th, &mut f).unwrap();
        assert!(r.h <= 0.5);
    }
    // No embedded pair: a configuration error.
    let mut o = RkOptions::plain(Tableau::builtin("rk4").unwrap(), 0.1);
    o.step_size = StepSize::ErrorControlled { h0: 0.1, control };
    assert!(RkSolver::<f64>::new(o).is_err());
}

/// A quadratic whose gradient is NaN outside |θ_i| < 10: a too-large step lands there.
struct Cliff(DiagonalQuadratic);
impl VectorField<f32> for Cliff {
    fn dim(&self) -> usize {
        <DiagonalQuadratic as VectorField<f32>>::dim(&self.0)
    }
    fn eval(&mut self, theta: &[f32], grad: &mut [f32]) -> Result<f64> {
        let loss = self.0.eval(theta, grad)?;
        if theta.iter().any(|x| x.abs() >= 10.0) {
            grad.iter_mut().for_each(|g| *g = f32::NAN);
            return Ok(f64::NAN);
        }
        Ok(loss)
    }
}

#[test]
fn nonfinite_stage_is_retried_with_smaller_h() {
    let mut s = RkSolver::<f32>::new(full_options("rk4", true)).unwrap();
    s.opts.preconditioner = Preconditioner::None;
    s.opts.momentum = 0.0;
    s.opts.step_size = StepSize::Constant { lr: 8.0 };
    let mut f = Cliff(DiagonalQuadratic::new(vec![1.0]));
    let mut th = vec![2.0f32];
    // stage 2 at 2 − 8·½·2 = −6 fine; stage 3 at 2 − 4·k2 = 2 + 4·6 = 26 → NaN; h/2 = 4 works.
    let r = s.step(0, &mut th, &mut f).unwrap();
    assert!(r.nonfinite_retries >= 1);
    assert!(r.h < 8.0);
    assert!(th[0].is_finite() && th[0].abs() < 10.0);
}

#[test]
fn nonfinite_failure_leaves_state_untouched() {
    let mut s = RkSolver::<f32>::new(full_options("rk4", true)).unwrap();
    let mut f = quad();
    let mut th = vec![1.0f32, -1.0, 0.5];
    s.step(0, &mut th, &mut f).unwrap();
    let (th_before, st_before) = (th.clone(), s.state().unwrap());
    // Gradient NaN at θ_n itself: nothing to retry.
    let mut bad = Cliff(DiagonalQuadratic::new(vec![1.0; 3]));
    let mut far = vec![20.0f32, 0.0, 0.0];
    let far_before = far.clone();
    let e = s.step(1, &mut far, &mut bad).unwrap_err();
    assert!(matches!(e, Error::NonFinite(_)), "{e}");
    assert_eq!(far, far_before);
    assert_eq!(s.state().unwrap(), st_before);
    // Every retry fails: the error comes after `nonfinite_retries` attempts, state intact.
    s.opts.step_size = StepSize::Constant { lr: 1e6 };
    s.opts.preconditioner = Preconditioner::ModifiedAdagrad;
    let mut th2 = vec![5.0f32, 0.0, 0.0];
    let th2_before = th2.clone();
    let e = s.step(1, &mut th2, &mut bad).unwrap_err();
    assert!(e.to_string().contains("retries"), "{e}");
    assert_eq!(th2, th2_before);
    assert_eq!(s.state().unwrap(), st_before);
    assert_eq!(th, th_before);
}

#[test]
fn state_round_trip_continues_bit_identically() {
    let mut o = full_options("rk4", true);
    o.step_size = StepSize::Dalr { c: 1.0, p: 0.8, estimator: DalrEstimator::Stage, fd_eps: 1e-2 };
    let mut a = RkSolver::<f32>::new(o.clone()).unwrap();
    let mut f = DiagonalQuadratic::new((0..20).map(|i| 0.2 + 0.1 * i as f64).collect());
    let mut th: Vec<f32> = (0..20).map(|i| (i as f32 * 0.3).cos()).collect();
    for n in 0..3 {
        a.step(n, &mut th, &mut f).unwrap();
    }
    let mut b = RkSolver::<f32>::new(o).unwrap();
    b.load_state(&a.state().unwrap()).unwrap();
    let mut th_b = th.clone();
    for n in 3..6 {
        let ra = a.step(n, &mut th, &mut f).unwrap();
        let rb = b.step(n, &mut th_b, &mut f).unwrap();
        assert_eq!(ra, rb);
    }
    assert_eq!(th, th_b);
    // A state with buffers the configuration does not use is refused.
    let mut plain = RkSolver::<f32>::new(RkOptions::plain(Tableau::builtin("rk4").unwrap(), 0.1)).unwrap();
    assert!(plain.load_state(&a.state().unwrap()).is_err());
}
