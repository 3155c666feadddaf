//! The benches of `kutta bench`.

pub mod collectives;
pub mod gpu;
pub mod steps;
pub mod sweep;
