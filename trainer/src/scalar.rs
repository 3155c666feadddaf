//! The floating-point type the solvers are generic over. Training runs in `f32`; the order-of-
//! accuracy tests run the very same solver code in `f64`, because a fifth-order method's local
//! error drops below f32 rounding long before its asymptotic slope shows.

use num_traits::Float;
use std::fmt::Debug;

pub trait Scalar: Float + Default + Debug + Send + Sync + 'static + std::iter::Sum {
    fn from_f64(x: f64) -> Self;
    fn as_f64(self) -> f64;
}

impl Scalar for f32 {
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    fn as_f64(self) -> f64 {
        self as f64
    }
}

impl Scalar for f64 {
    fn from_f64(x: f64) -> Self {
        x
    }
    fn as_f64(self) -> f64 {
        self
    }
}

/// Euclidean norm, accumulated in f64 so that long f32 buffers do not lose digits.
pub fn norm<F: Scalar>(x: &[F]) -> f64 {
    sum_squares(x).sqrt()
}

/// Σ x², accumulated in f64.
pub fn sum_squares<F: Scalar>(x: &[F]) -> f64 {
    x.iter()
        .map(|v| {
            let v = v.as_f64();
            v * v
        })
        .sum::<f64>()
}

/// True when every element is finite.
pub fn all_finite<F: Scalar>(x: &[F]) -> bool {
    x.iter().all(|v| v.is_finite())
}
