//! Butcher tableaux of explicit Runge-Kutta methods (SPEC.md §2) and the facts about them that the
//! optimizers need.
//!
//! An optimizer step is one explicit RK step of the gradient-flow ODE, so everything that makes a
//! method a method lives here: the built-in tableaux (euler … dopri54), validation of user-defined
//! tableaux from the config (`[optimizer.custom_tableau]`), the order of a weight vector measured
//! against the 17 rooted-tree order conditions of order ≤ 5 (so a user's tableau gets its order
//! *reported*, and the built-ins are checked against the algebra in tests rather than trusted),
//! and the stage-liveness analysis behind streaming memory (SPEC.md §6): `last_use` says when a
//! stage gradient k_j may be freed, `streaming_stage_buffers` how many are live at the peak.
//!
//! Indices in this module and in its error messages are 0-based (`a[i][j]`, stage `i`), as in the
//! TOML arrays a user writes.

use crate::error::{Error, Result};

/// A user-defined tableau from the config file (`[optimizer.custom_tableau]`).
///
/// `a` must be the full s×s matrix (zeros on and above the diagonal), `b` the s weights; `b_hat`
/// optional embedded weights (for error control); `c` optional and, if given, must equal the row
/// sums of `a` (it is never used otherwise: the trainer always takes c_i = Σ_j a_ij).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomTableau {
    pub name: Option<String>,
    pub a: Vec<Vec<f64>>,
    pub b: Vec<f64>,
    #[serde(default)]
    pub b_hat: Option<Vec<f64>>,
    #[serde(default)]
    pub c: Option<Vec<f64>>,
}

/// A validated explicit Runge-Kutta method.
#[derive(Clone, Debug, PartialEq)]
pub struct Tableau {
    pub name: String,
    /// s×s, strictly lower triangular.
    pub a: Vec<Vec<f64>>,
    /// s weights of the propagated solution, Σb = 1.
    pub b: Vec<f64>,
    /// Embedded lower-order weights (Σb̂ = 1), for error estimates.
    pub b_hat: Option<Vec<f64>>,
    /// c_i = Σ_j a_ij.
    pub c: Vec<f64>,
}

/// Tolerance of the consistency checks on user input (Σb = 1, c = row sums of a).
const VALIDATION_TOL: f64 = 1e-12;
/// Tolerance under which an order condition counts as satisfied.
const ORDER_TOL: f64 = 1e-10;
/// Highest order whose conditions are enumerated.
const MAX_ORDER: u32 = 5;

const BUILTIN_NAMES: &[&str] =
    &["euler", "heun", "midpoint", "ralston2", "kutta3", "ssprk3", "rk4", "rk38", "bs32", "dopri54"];

/// Accepted alternative names and the canonical name they stand for.
const ALIASES: &[(&str, &str)] = &[("rk2", "heun"), ("rk3", "kutta3")];

/// The full s×s matrix from its strictly-lower-triangular rows: `rows[i]` holds a_i0..a_i(i-1),
/// so `rows[0]` is empty. Keeps the built-in coefficients readable.
fn lower(rows: &[&[f64]]) -> Vec<Vec<f64>> {
    let s = rows.len();
    rows.iter()
        .enumerate()
        .map(|(i, r)| {
            assert_eq!(r.len(), i, "built-in tableau row {i} must have {i} entries");
            let mut full = vec![0.0; s];
            full[..i].copy_from_slice(r);
            full
        })
        .collect()
}

fn builtin_spec(name: &str) -> Option<CustomTableau> {
    let spec = |a: Vec<Vec<f64>>, b: Vec<f64>, b_hat: Option<Vec<f64>>| CustomTableau {
        name: Some(name.to_string()),
        a,
        b,
        b_hat,
        c: None,
    };
    Some(match name {
        "euler" => spec(lower(&[&[]]), vec![1.0], None),
        "heun" => spec(lower(&[&[], &[1.0]]), vec![0.5, 0.5], None),
        "midpoint" => spec(lower(&[&[], &[0.5]]), vec![0.0, 1.0], None),
        "ralston2" => spec(lower(&[&[], &[2.0 / 3.0]]), vec![0.25, 0.75], None),
        "kutta3" => spec(lower(&[&[], &[0.5], &[-1.0, 2.0]]), vec![1.0 / 6.0, 2.0 / 3.0, 1.0 / 6.0], None),
        // Shu-Osher strong-stability-preserving RK3.
        "ssprk3" => spec(lower(&[&[], &[1.0], &[0.25, 0.25]]), vec![1.0 / 6.0, 1.0 / 6.0, 2.0 / 3.0], None),
        "rk4" => spec(
            lower(&[&[], &[0.5], &[0.0, 0.5], &[0.0, 0.0, 1.0]]),
            vec![1.0 / 6.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 6.0],
            None,
        ),
        // Kutta's 3/8 rule.
        "rk38" => spec(
            lower(&[&[], &[1.0 / 3.0], &[-1.0 / 3.0, 1.0], &[1.0, -1.0, 1.0]]),
            vec![1.0 / 8.0, 3.0 / 8.0, 3.0 / 8.0, 1.0 / 8.0],
            None,
        ),
        // Bogacki-Shampine 3(2), FSAL: b is order 3, b_hat order 2.
        "bs32" => spec(
            lower(&[&[], &[0.5], &[0.0, 0.75], &[2.0 / 9.0, 1.0 / 3.0, 4.0 / 9.0]]),
            vec![2.0 / 9.0, 1.0 / 3.0, 4.0 / 9.0, 0.0],
            Some(vec![7.0 / 24.0, 0.25, 1.0 / 3.0, 1.0 / 8.0]),
        ),
        // Dormand-Prince 5(4), FSAL: b is order 5, b_hat order 4.
        "dopri54" => spec(
            lower(&[
                &[],
                &[1.0 / 5.0],
                &[3.0 / 40.0, 9.0 / 40.0],
                &[44.0 / 45.0, -56.0 / 15.0, 32.0 / 9.0],
                &[19372.0 / 6561.0, -25360.0 / 2187.0, 64448.0 / 6561.0, -212.0 / 729.0],
                &[9017.0 / 3168.0, -355.0 / 33.0, 46732.0 / 5247.0, 49.0 / 176.0, -5103.0 / 18656.0],
                &[35.0 / 384.0, 0.0, 500.0 / 1113.0, 125.0 / 192.0, -2187.0 / 6784.0, 11.0 / 84.0],
            ]),
            vec![35.0 / 384.0, 0.0, 500.0 / 1113.0, 125.0 / 192.0, -2187.0 / 6784.0, 11.0 / 84.0, 0.0],
            Some(vec![
                5179.0 / 57600.0,
                0.0,
                7571.0 / 16695.0,
                393.0 / 640.0,
                -92097.0 / 339200.0,
                187.0 / 2100.0,
                1.0 / 40.0,
            ]),
        ),
        _ => return None,
    })
}

// ---- small vector helpers for the order conditions -------------------------------------------

fn dot(u: &[f64], v: &[f64]) -> f64 {
    u.iter().zip(v).map(|(x, y)| x * y).sum()
}

/// Elementwise product u ⊙ v.
fn mul(u: &[f64], v: &[f64]) -> Vec<f64> {
    u.iter().zip(v).map(|(x, y)| x * y).collect()
}

/// Elementwise power v^k.
fn pow(v: &[f64], k: i32) -> Vec<f64> {
    v.iter().map(|x| x.powi(k)).collect()
}

impl Tableau {
    /// A built-in tableau by name (`rk2` and `rk3` are accepted as aliases of `heun` and
    /// `kutta3`; the returned name is the canonical one). Case-insensitive.
    pub fn builtin(name: &str) -> Result<Tableau> {
        let lowered = name.trim().to_ascii_lowercase();
        let canonical =
            ALIASES.iter().find(|(alias, _)| *alias == lowered).map(|(_, c)| *c).unwrap_or(lowered.as_str());
        match builtin_spec(canonical) {
            // Built-ins go through exactly the validation a user's tableau does.
            Some(spec) => Tableau::custom(&spec),
            None => {
                let aliases: Vec<String> = ALIASES.iter().map(|(a, c)| format!("{a} = {c}")).collect();
                Err(Error::Tableau {
                    name: name.to_string(),
                    msg: format!(
                        "unknown built-in tableau; known: {} (aliases: {}), or \"custom\" with a \
                         custom_tableau table beside it (a, b)",
                        BUILTIN_NAMES.join(", "),
                        aliases.join(", ")
                    ),
                })
            }
        }
    }

    /// Canonical names of the built-in tableaux, lowest order first.
    pub fn builtin_names() -> &'static [&'static str] {
        BUILTIN_NAMES
    }

    /// Validates a user-defined tableau: at least one stage; `a` square s×s; all entries finite;
    /// `a` strictly lower triangular; `b` (and `b_hat`, `c` if given) of length s; Σb = 1 and
    /// Σb̂ = 1 within 1e-12; b̂ ≠ b; `c`, if given, equal to the row sums of `a` within 1e-12.
    pub fn custom(spec: &CustomTableau) -> Result<Tableau> {
        let name = spec.name.clone().unwrap_or_else(|| "custom".to_string());
        let fail = |msg: String| Error::Tableau { name: name.clone(), msg };
        let s = spec.a.len();

        if s == 0 {
            return Err(fail("`a` has no rows: a tableau needs at least 1 stage".to_string()));
        }
        for (i, row) in spec.a.iter().enumerate() {
            if row.len() != s {
                return Err(fail(format!(
                    "row {i} of `a` has {} entries, expected {s} (a must be s×s, s = {s} rows)",
                    row.len()
                )));
            }
        }
        for (i, row) in spec.a.iter().enumerate() {
            for (j, &x) in row.iter().enumerate() {
                if !x.is_finite() {
                    return Err(fail(format!("a[{i}][{j}] = {x} is not finite")));
                }
                if j >= i && x != 0.0 {
                    return Err(fail(format!(
                        "a[{i}][{j}] = {x} is on or above the diagonal: explicit methods need a \
                         strictly lower-triangular A"
                    )));
                }
            }
        }

        check_weights(&spec.b, "b", s).map_err(&fail)?;
        if let Some(b_hat) = &spec.b_hat {
            check_weights(b_hat, "b_hat", s).map_err(&fail)?;
            if b_hat.iter().zip(&spec.b).all(|(x, y)| x == y) {
                return Err(fail("b_hat equals b: the embedded error estimate would be identically zero".to_string()));
            }
        }

        let c: Vec<f64> = spec.a.iter().map(|row| row.iter().sum()).collect();
        if let Some(given) = &spec.c {
            if given.len() != s {
                return Err(fail(format!("`c` has {} entries, expected {s} (one per stage)", given.len())));
            }
            for (i, (&ci, &sum)) in given.iter().zip(&c).enumerate() {
                if !ci.is_finite() {
                    return Err(fail(format!("c[{i}] = {ci} is not finite")));
                }
                if (ci - sum).abs() > VALIDATION_TOL {
                    return Err(fail(format!("c[{i}] = {ci} but Σ_j a[{i}][j] = {sum}: c must be the row sums of a")));
                }
            }
        }

        Ok(Tableau { name, a: spec.a.clone(), b: spec.b.clone(), b_hat: spec.b_hat.clone(), c })
    }

    /// Number of stages s (gradient evaluations per step).
    pub fn stages(&self) -> usize {
        self.b.len()
    }

    /// Order of the propagated weights `b`: the highest p ≤ 5 such that every order condition of
    /// order ≤ p holds within 1e-10; 0 if even Σb = 1 fails.
    pub fn order(&self) -> u32 {
        self.order_of(&self.b)
    }

    /// Order of the embedded weights `b_hat`, if there are any.
    pub fn embedded_order(&self) -> Option<u32> {
        self.b_hat.as_ref().map(|w| self.order_of(w))
    }

    fn order_of(&self, weights: &[f64]) -> u32 {
        let residuals = self.order_condition_residuals(weights);
        let mut order = 0;
        for p in 1..=MAX_ORDER {
            let holds = residuals.iter().filter(|(q, _, _)| *q == p).all(|(_, _, r)| r.abs() <= ORDER_TOL);
            if !holds {
                break;
            }
            order = p;
        }
        order
    }

    /// The 17 rooted-tree order conditions of order 1..=5 evaluated for `weights` (b or b̂), as
    /// (order, condition, residual = left side − right side). Uses c_i = Σ_j a_ij.
    ///
    /// Panics if `weights` does not have one entry per stage.
    pub fn order_condition_residuals(&self, weights: &[f64]) -> Vec<(u32, String, f64)> {
        assert_eq!(
            weights.len(),
            self.stages(),
            "order conditions of tableau `{}`: {} weights for {} stages",
            self.name,
            weights.len(),
            self.stages()
        );
        let w = weights;
        let a_times = |v: &[f64]| -> Vec<f64> { self.a.iter().map(|row| dot(row, v)).collect() };
        let c = &self.c;
        let ones = vec![1.0; c.len()];
        let c2 = pow(c, 2);
        let c3 = pow(c, 3);
        let ac = a_times(c); // (Ac)_i = Σ_j a_ij c_j
        let ac2 = a_times(&c2);
        let aac = a_times(&ac);

        // (order, condition, Σ_i w_i φ_i, 1/γ(tree))
        let conditions: Vec<(u32, &str, f64, f64)> = vec![
            (1, "Σ b_i = 1", dot(w, &ones), 1.0),
            (2, "Σ b_i c_i = 1/2", dot(w, c), 1.0 / 2.0),
            (3, "Σ b_i c_i² = 1/3", dot(w, &c2), 1.0 / 3.0),
            (3, "Σ b_i a_ij c_j = 1/6", dot(w, &ac), 1.0 / 6.0),
            (4, "Σ b_i c_i³ = 1/4", dot(w, &c3), 1.0 / 4.0),
            (4, "Σ b_i c_i a_ij c_j = 1/8", dot(w, &mul(c, &ac)), 1.0 / 8.0),
            (4, "Σ b_i a_ij c_j² = 1/12", dot(w, &ac2), 1.0 / 12.0),
            (4, "Σ b_i a_ij a_jk c_k = 1/24", dot(w, &aac), 1.0 / 24.0),
            (5, "Σ b_i c_i⁴ = 1/5", dot(w, &pow(c, 4)), 1.0 / 5.0),
            (5, "Σ b_i c_i² a_ij c_j = 1/10", dot(w, &mul(&c2, &ac)), 1.0 / 10.0),
            (5, "Σ b_i (Σ_j a_ij c_j)² = 1/20", dot(w, &mul(&ac, &ac)), 1.0 / 20.0),
            (5, "Σ b_i c_i a_ij c_j² = 1/15", dot(w, &mul(c, &ac2)), 1.0 / 15.0),
            (5, "Σ b_i c_i a_ij a_jk c_k = 1/30", dot(w, &mul(c, &aac)), 1.0 / 30.0),
            (5, "Σ b_i a_ij c_j³ = 1/20", dot(w, &a_times(&c3)), 1.0 / 20.0),
            (5, "Σ b_i a_ij c_j a_jk c_k = 1/40", dot(w, &a_times(&mul(c, &ac))), 1.0 / 40.0),
            (5, "Σ b_i a_ij a_jk c_k² = 1/60", dot(w, &a_times(&ac2)), 1.0 / 60.0),
            (5, "Σ b_i a_ij a_jk a_kl c_l = 1/120", dot(w, &a_times(&aac)), 1.0 / 120.0),
        ];
        conditions.into_iter().map(|(p, text, lhs, rhs)| (p, text.to_string(), lhs - rhs)).collect()
    }

    /// Whether the tableau carries embedded weights b̂ (error control is possible).
    pub fn is_embedded(&self) -> bool {
        self.b_hat.is_some()
    }

    /// Error weights b − b̂ (the error estimate is h·D·Σ_j (b_j − b̂_j) k_j), if embedded.
    pub fn error_weights(&self) -> Option<Vec<f64>> {
        self.b_hat.as_ref().map(|bh| self.b.iter().zip(bh).map(|(b, bh)| b - bh).collect())
    }

    /// 0-based index of the last stage i whose point θ_i needs k_j (a[i][j] ≠ 0); `j` itself if
    /// no later stage uses it (k_j then only feeds the final combination, which streaming adds
    /// into the accumulators as soon as k_j exists).
    pub fn last_use(&self, j: usize) -> usize {
        (j + 1..self.stages()).rev().find(|&i| self.a[i][j] != 0.0).unwrap_or(j)
    }

    /// Peak number of stage-gradient buffers live under streaming (SPEC.md §6):
    /// max over stages i of 1 + |{ j < i : last_use(j) > i }| — k_i being produced, plus the
    /// earlier k_j a later stage point still needs. (k_j with last_use(j) = i is consumed when
    /// θ_i is formed, before g(θ_i) is evaluated, so it is already free.) The b and b − b̂
    /// accumulators are not counted.
    pub fn streaming_stage_buffers(&self) -> usize {
        let s = self.stages();
        let last: Vec<usize> = (0..s).map(|j| self.last_use(j)).collect();
        (0..s).map(|i| 1 + (0..i).filter(|&j| last[j] > i).count()).max().unwrap_or(0)
    }

    /// First same as last: the last row of `a` equals `b`, so the last stage point is θ_{n+1}
    /// (e.g. bs32, dopri54). This only reports the property. Reusing k_s as the next step's k_1
    /// is valid only if the next step evaluates the same loss; with a fresh mini-batch per step
    /// (SPEC.md §1) it is not, and the trainer must not skip that evaluation.
    pub fn fsal(&self) -> bool {
        let s = self.stages();
        s >= 2 && self.a[s - 1].iter().zip(&self.b).all(|(x, y)| (x - y).abs() <= VALIDATION_TOL)
    }
}

/// Checks a weight vector (`b` or `b_hat`): one finite entry per stage, summing to 1.
fn check_weights(w: &[f64], what: &str, s: usize) -> std::result::Result<(), String> {
    if w.len() != s {
        return Err(format!("`{what}` has {} entries, expected {s} (one weight per stage; `a` has {s} rows)", w.len()));
    }
    for (i, &x) in w.iter().enumerate() {
        if !x.is_finite() {
            return Err(format!("{what}[{i}] = {x} is not finite"));
        }
    }
    let sum: f64 = w.iter().sum();
    if (sum - 1.0).abs() > VALIDATION_TOL {
        return Err(format!("Σ{what} = {sum}, must be 1 (consistency, order 1)"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str) -> Tableau {
        Tableau::builtin(name).unwrap()
    }

    fn err_msg(spec: &CustomTableau) -> String {
        match Tableau::custom(spec) {
            Err(e @ Error::Tableau { .. }) => e.to_string(),
            Err(e) => panic!("wrong error kind: {e}"),
            Ok(t) => panic!("accepted invalid tableau {t:?}"),
        }
    }

    fn heun_spec() -> CustomTableau {
        CustomTableau {
            name: Some("my-heun".into()),
            a: vec![vec![0.0, 0.0], vec![1.0, 0.0]],
            b: vec![0.5, 0.5],
            b_hat: None,
            c: Some(vec![0.0, 1.0]),
        }
    }

    #[test]
    fn builtin_orders() {
        let expected = [
            ("euler", 1, 1, None),
            ("heun", 2, 2, None),
            ("midpoint", 2, 2, None),
            ("ralston2", 2, 2, None),
            ("kutta3", 3, 3, None),
            ("ssprk3", 3, 3, None),
            ("rk4", 4, 4, None),
            ("rk38", 4, 4, None),
            ("bs32", 3, 4, Some(2)),
            ("dopri54", 5, 7, Some(4)),
        ];
        assert_eq!(expected.len(), Tableau::builtin_names().len());
        for ((name, order, stages, emb), canonical) in expected.iter().zip(Tableau::builtin_names()) {
            assert_eq!(name, canonical);
            let tab = t(name);
            assert_eq!(tab.name, *name);
            assert_eq!(tab.order(), *order, "{name}");
            assert_eq!(tab.stages(), *stages, "{name}");
            assert_eq!(tab.embedded_order(), *emb, "{name}");
            assert_eq!(tab.is_embedded(), emb.is_some(), "{name}");
        }
    }

    #[test]
    fn c_is_row_sums() {
        for name in Tableau::builtin_names() {
            let tab = t(name);
            for (i, row) in tab.a.iter().enumerate() {
                let sum: f64 = row.iter().sum();
                assert!((tab.c[i] - sum).abs() < 1e-15, "{name} c[{i}]");
            }
        }
        let close = |u: &[f64], v: &[f64]| u.iter().zip(v).all(|(x, y)| (x - y).abs() < 1e-14);
        assert!(close(&t("rk4").c, &[0.0, 0.5, 0.5, 1.0]));
        assert!(close(&t("rk38").c, &[0.0, 1.0 / 3.0, 2.0 / 3.0, 1.0]));
        assert!(close(&t("ssprk3").c, &[0.0, 1.0, 0.5]));
        assert!(close(&t("bs32").c, &[0.0, 0.5, 0.75, 1.0]));
        assert!(close(&t("dopri54").c, &[0.0, 0.2, 0.3, 0.8, 8.0 / 9.0, 1.0, 1.0]));
    }

    #[test]
    fn residuals_vanish_up_to_the_order() {
        for name in Tableau::builtin_names() {
            let tab = t(name);
            let mut weights = vec![(tab.b.clone(), tab.order())];
            if let (Some(bh), Some(p)) = (&tab.b_hat, tab.embedded_order()) {
                weights.push((bh.clone(), p));
            }
            for (w, p) in weights {
                let res = tab.order_condition_residuals(&w);
                assert_eq!(res.len(), 17);
                for q in 1..=5 {
                    let n = res.iter().filter(|(o, _, _)| *o == q).count();
                    assert_eq!(n, [1, 1, 2, 4, 9][q as usize - 1]);
                }
                for (q, text, r) in &res {
                    if *q <= p {
                        assert!(r.abs() < 1e-12, "{name}: {text} residual {r}");
                    }
                }
                // The order is exact: some condition of order p+1 fails (p < 5).
                if p < 5 {
                    assert!(res.iter().any(|(q, _, r)| *q == p + 1 && r.abs() > ORDER_TOL));
                }
            }
        }
    }

    #[test]
    fn residual_text_is_readable() {
        let res = t("rk4").order_condition_residuals(&t("rk4").b);
        assert_eq!(res[0].1, "Σ b_i = 1");
        assert_eq!(res[2].1, "Σ b_i c_i² = 1/3");
        assert_eq!(res[16].1, "Σ b_i a_ij a_jk a_kl c_l = 1/120");
        // rk4 is order 4 exactly; its Σ b c⁴ is 5/24, not 1/5.
        assert!((res[8].2 - (5.0 / 24.0 - 0.2)).abs() < 1e-15);
    }

    #[test]
    fn perturbed_rk4_loses_order() {
        let mut tab = t("rk4");
        let eps = 1e-3;
        tab.b[0] += eps;
        tab.b[1] -= eps;
        assert!((tab.b.iter().sum::<f64>() - 1.0).abs() < 1e-15);
        assert_eq!(tab.order(), 1);
        // A perturbation keeping Σb c = 1/2 (c_1 = c_2) keeps order 2 but loses 3.
        let mut tab = t("rk4");
        tab.b[1] += eps;
        tab.b[2] -= eps;
        // Σ b c² is unchanged too, but Σ b a c moves by −ε/4: order 2.
        assert_eq!(tab.order(), 2);
        // Σb = 0.99: order 0.
        let mut tab = t("rk4");
        tab.b[0] -= 0.01;
        assert_eq!(tab.order(), 0);
    }

    #[test]
    fn custom_heun_is_accepted() {
        let tab = Tableau::custom(&heun_spec()).unwrap();
        assert_eq!(tab.name, "my-heun");
        assert_eq!(tab.order(), 2);
        assert_eq!(tab.c, vec![0.0, 1.0]);
        assert_eq!(tab.a, t("heun").a);
        let anonymous = CustomTableau { name: None, c: None, ..heun_spec() };
        assert_eq!(Tableau::custom(&anonymous).unwrap().name, "custom");
    }

    #[test]
    fn custom_from_toml() {
        let spec: CustomTableau =
            toml::from_str("name = \"mid\"\na = [[0.0, 0.0], [0.5, 0.0]]\nb = [0.0, 1.0]\n").unwrap();
        let tab = Tableau::custom(&spec).unwrap();
        assert_eq!(tab.order(), 2);
        assert!(toml::from_str::<CustomTableau>("a = [[0.0]]\nb = [1.0]\nbogus = 1\n").is_err());
    }

    #[test]
    fn custom_validation_errors() {
        let empty = CustomTableau { name: None, a: vec![], b: vec![], b_hat: None, c: None };
        assert!(err_msg(&empty).contains("at least 1 stage"));

        let non_square = CustomTableau { a: vec![vec![0.0, 0.0], vec![1.0]], ..heun_spec() };
        let m = err_msg(&non_square);
        assert!(m.contains("row 1 of `a` has 1 entries, expected 2"), "{m}");
        assert!(m.contains("my-heun"), "{m}");

        let upper = CustomTableau { a: vec![vec![0.0, 0.5], vec![1.0, 0.0]], c: None, ..heun_spec() };
        let m = err_msg(&upper);
        assert!(m.contains("a[0][1] = 0.5 is on or above the diagonal"), "{m}");
        let diag = CustomTableau { a: vec![vec![0.0, 0.0], vec![1.0, 0.25]], c: None, ..heun_spec() };
        assert!(err_msg(&diag).contains("a[1][1] = 0.25"));

        let bad_sum = CustomTableau { b: vec![0.5, 0.4], ..heun_spec() };
        let m = err_msg(&bad_sum);
        assert!(m.contains("Σb = 0.9, must be 1"), "{m}");

        let bad_b_len = CustomTableau { b: vec![1.0], ..heun_spec() };
        assert!(err_msg(&bad_b_len).contains("`b` has 1 entries, expected 2"));

        let bad_c = CustomTableau { c: Some(vec![0.0, 0.5]), ..heun_spec() };
        let m = err_msg(&bad_c);
        assert!(m.contains("c[1] = 0.5 but Σ_j a[1][j] = 1"), "{m}");
        let bad_c_len = CustomTableau { c: Some(vec![0.0]), ..heun_spec() };
        assert!(err_msg(&bad_c_len).contains("`c` has 1 entries, expected 2"));

        let bad_b_hat_len = CustomTableau { b_hat: Some(vec![1.0]), ..heun_spec() };
        let m = err_msg(&bad_b_hat_len);
        assert!(m.contains("`b_hat` has 1 entries, expected 2"), "{m}");
        let bad_b_hat_sum = CustomTableau { b_hat: Some(vec![1.0, 0.5]), ..heun_spec() };
        assert!(err_msg(&bad_b_hat_sum).contains("Σb_hat = 1.5, must be 1"));
        let same_b_hat = CustomTableau { b_hat: Some(vec![0.5, 0.5]), ..heun_spec() };
        assert!(err_msg(&same_b_hat).contains("b_hat equals b"));

        let nan = CustomTableau { a: vec![vec![0.0, 0.0], vec![f64::NAN, 0.0]], c: None, ..heun_spec() };
        assert!(err_msg(&nan).contains("a[1][0] = NaN is not finite"));
        let inf_b = CustomTableau { b: vec![f64::INFINITY, 0.5], ..heun_spec() };
        assert!(err_msg(&inf_b).contains("b[0] = inf is not finite"));

        // An embedded custom pair (Euler embedded in Heun) is accepted.
        let pair = CustomTableau { b_hat: Some(vec![1.0, 0.0]), ..heun_spec() };
        let tab = Tableau::custom(&pair).unwrap();
        assert_eq!((tab.order(), tab.embedded_order()), (2, Some(1)));
        assert_eq!(tab.error_weights(), Some(vec![-0.5, 0.5]));
    }

    #[test]
    fn aliases_and_unknown_names() {
        assert_eq!(t("rk2").a, t("heun").a);
        assert_eq!(t("rk2").b, t("heun").b);
        assert_eq!(t("rk3").b, t("kutta3").b);
        assert_eq!(t("rk3").order(), 3);
        assert_eq!(t("RK4").name, "rk4");
        let e = Tableau::builtin("rk5").unwrap_err();
        let m = e.to_string();
        assert!(matches!(e, Error::Tableau { ref name, .. } if name == "rk5"));
        assert!(m.contains("unknown built-in tableau"), "{m}");
        for name in Tableau::builtin_names() {
            assert!(m.contains(name), "{m} lacks {name}");
        }
        assert!(m.contains("rk2 = heun") && m.contains("rk3 = kutta3"), "{m}");
    }

    #[test]
    fn builtins_survive_a_round_trip_through_custom() {
        for name in Tableau::builtin_names() {
            let tab = t(name);
            let spec = CustomTableau {
                name: Some(tab.name.clone()),
                a: tab.a.clone(),
                b: tab.b.clone(),
                b_hat: tab.b_hat.clone(),
                c: Some(tab.c.clone()),
            };
            assert_eq!(Tableau::custom(&spec).unwrap(), tab);
        }
    }

    #[test]
    fn liveness_and_streaming_buffers() {
        let euler = t("euler");
        assert_eq!(euler.last_use(0), 0);
        assert_eq!(euler.streaming_stage_buffers(), 1);

        // rk4: θ_{i+1} needs only k_i.
        let rk4 = t("rk4");
        assert_eq!((0..4).map(|j| rk4.last_use(j)).collect::<Vec<_>>(), vec![1, 2, 3, 3]);
        assert_eq!(rk4.streaming_stage_buffers(), 1);

        // rk38: the last stage point needs k_0, k_1, k_2; while k_2 is produced, k_0 and k_1 wait.
        let rk38 = t("rk38");
        assert_eq!((0..4).map(|j| rk38.last_use(j)).collect::<Vec<_>>(), vec![3, 3, 3, 3]);
        assert_eq!(rk38.streaming_stage_buffers(), 3);

        // dopri54 (0-based): a[6][1] = 0 but a[5][1] ≠ 0, so k_1 dies at stage 5; every other
        // k_j (j < 6) is needed by the FSAL stage 6. Live counts per stage i:
        // i=0:1, 1:2, 2:3, 3:4, 4:5 (k_0..k_3 wait), 5: 1 + |{0,2,3,4}| = 5, 6:1 → peak 5.
        let dp = t("dopri54");
        assert_eq!((0..7).map(|j| dp.last_use(j)).collect::<Vec<_>>(), vec![6, 5, 6, 6, 6, 6, 6]);
        assert_eq!(dp.streaming_stage_buffers(), 5);

        // bs32: a[2][0] = 0, but the FSAL stage 3 needs k_0, k_1, k_2; peak at stage 2:
        // 1 + |{0, 1}| = 3.
        let bs = t("bs32");
        assert_eq!((0..4).map(|j| bs.last_use(j)).collect::<Vec<_>>(), vec![3, 3, 3, 3]);
        assert_eq!(bs.streaming_stage_buffers(), 3);
    }

    #[test]
    fn fsal_flags() {
        for name in Tableau::builtin_names() {
            let expected = matches!(*name, "bs32" | "dopri54");
            assert_eq!(t(name).fsal(), expected, "{name}");
        }
    }
}
