//! kutta's trainer: Runge-Kutta solvers of the gradient-flow ODE dθ/dt = −D∇L(θ) used as
//! optimizers (SPEC.md), the Euler-type baselines, models, data, and the training loop.
//!
//! The one obvious path: a `config::Config` → `train::train` (or `train::resume`) builds a
//! `model::Model` (through `model::registry`) and a `data::Dataset`, wraps them in a
//! `model::ModelField` (the gradient oracle) inside a `distributed::ShardedField` (the
//! all-reduce), and hands that to an `optim::Optimizer` once per step. Every buffer the optimizers
//! touch is a flat `f32` slice in the model's `layout::ParamLayout`.
//!
//! The modules form layers, each using only the ones below it (`tests/module_layers.rs` checks
//! this and prints them): `layout`, `scalar`, `threads` (compute threads per rank), `team`
//! (threads in lock step) → `kernels` (the CUDA kernels' references; the kernels themselves, or
//! a stub without the `cuda` feature) → `error`, `memory` → `data`,
//! `field`, `stop`, `tableau`, `tensorboard` → `integrity`, `optim` → `model` → `checkpoint`, `config`,
//! `distributed` → `device`, `planner` → `train`.

pub mod data;
pub mod device;
pub mod error;
pub mod field;
pub mod layout;
pub mod model;
pub mod optim;
pub mod scalar;
pub mod tableau;
pub mod team;
pub mod threads;

pub use error::{Error, Result};
pub mod checkpoint;
pub mod config;
pub mod distributed;
pub mod integrity;
pub mod kernels;
pub mod memory;
pub mod planner;
pub mod stop;
pub mod tensorboard;
pub mod train;
