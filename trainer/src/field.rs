//! The gradient oracle the solvers call. A `VectorField` hides the model, the mini-batch, the
//! micro-batching and (later) the all-reduce: the solver only asks "the gradient at θ, please".
//! Every stage of one optimizer step uses the same mini-batch (SPEC §1), so the trainer sets the
//! batch on the field before the step and the solver may call `eval` as often as it needs.

use crate::error::Result;
use crate::scalar::Scalar;

///
/// `B` is the kind of flat buffer θ and the gradient live in: host slices `[F]` (the default),
/// or device buffers for a solver that runs on a GPU (`optim::arith`).
pub trait VectorField<F: Scalar = f32, B: ?Sized = [F]> {
    /// Number of parameters P.
    fn dim(&self) -> usize;
    /// Write g(θ) = ∇L_B(θ) into `grad` (length P) and return L_B(θ).
    fn eval(&mut self, theta: &B, grad: &mut B) -> Result<f64>;
    /// Sum a per-entry partial result (a sum of squares, a count of non-finite entries) over
    /// every part of θ. A field whose θ is one rank's shard of the parameter vector (the sharded
    /// optimizer, `distributed::ShardedField`) all-reduces it, so every rank takes the same
    /// decisions (step size, acceptance, retries); for a whole θ it is `x` itself.
    fn sum_shards(&mut self, x: f64) -> Result<f64> {
        Ok(x)
    }
    /// The same field on flat GPU buffers, when it can evaluate there (the trainer's field once
    /// the solver runs on the GPU; `optim::gpu::GpuRk` asks for it). None by default.
    fn on_device(&mut self) -> Option<&mut dyn VectorField<f32, crate::kernels::cuda::DeviceBuf>> {
        None
    }
}

/// True when some entry of `parts` is NaN/Inf on any shard of θ: the count of such entries goes
/// through `sum_shards`, so every rank of a sharded optimizer reaches the same verdict.
pub fn any_nonfinite<F: Scalar>(field: &mut dyn VectorField<F>, parts: &[&[F]]) -> Result<bool> {
    let local: usize = parts.iter().map(|p| p.iter().filter(|v| !v.is_finite()).count()).sum();
    Ok(field.sum_shards(local as f64)? > 0.0)
}

/// L(θ) = ½ Σ_i λ_i θ_i² — a quadratic with diagonal Hessian H = diag(λ). Its gradient flow is
/// known in closed form, θ_i(t) = exp(−λ_i t) θ_i(0), which is what the order tests measure
/// against. `evals` counts gradient evaluations.
#[derive(Clone, Debug)]
pub struct DiagonalQuadratic {
    pub lambda: Vec<f64>,
    pub evals: usize,
}

impl DiagonalQuadratic {
    pub fn new(lambda: Vec<f64>) -> Self {
        Self { lambda, evals: 0 }
    }
    /// θ(t) under exact gradient flow with D = I.
    pub fn exact_flow<F: Scalar>(&self, theta0: &[F], t: f64) -> Vec<f64> {
        theta0.iter().zip(&self.lambda).map(|(x, l)| x.as_f64() * (-l * t).exp()).collect()
    }
}

impl<F: Scalar> VectorField<F> for DiagonalQuadratic {
    fn dim(&self) -> usize {
        self.lambda.len()
    }
    fn eval(&mut self, theta: &[F], grad: &mut [F]) -> Result<f64> {
        self.evals += 1;
        let mut loss = 0.0;
        for ((g, x), l) in grad.iter_mut().zip(theta).zip(&self.lambda) {
            let x = x.as_f64();
            *g = F::from_f64(l * x);
            loss += 0.5 * l * x * x;
        }
        Ok(loss)
    }
}
