//! Custom CUDA kernels for the Runge-Kutta arithmetic on flat f32 parameter buffers (SPEC §2-4,
//! §6), with a CPU reference for every kernel.
//!
//! - [`self::reference`] (always compiled): one plain-Rust function per kernel on host slices. They
//!   define what each kernel computes and perform exactly the floating-point operations of
//!   `optim::rk` in the same order (a test chains them into whole RK steps and compares with
//!   `RkSolver` bitwise).
//! - `cuda` (feature `cuda`): `cuda::RkKernels` loads the kernels of `rk.cu` once into a cudarc
//!   context and exposes one safe, length-checked method per kernel on `CudaSlice<f32>` / views,
//!   plus `cuda::RkKernels::bandwidth`, which times each kernel against the device's copy
//!   bandwidth.
//! - `check` (feature `cuda`): `check::run` runs every kernel against its reference on the GPU
//!   and returns one row per check; `trainer/tests/kernels.rs` and `kutta bench kernels` call it.
//!
//! The kernels are compiled at BUILD time: with the `cuda` feature, `build.rs` runs `nvcc --ptx`
//! on `rk.cu` (virtual architecture `compute_$CUDA_COMPUTE_CAP`, default 90; the driver JIT-
//! compiles the PTX for the GPU it runs on) and the PTX is embedded in the library. So a build
//! with `--features cuda` fails on a kernel compile error even on a machine without a GPU (CI),
//! instead of at run time. Without the feature nothing CUDA-related is built or needed.
//!
//! The kernels and their Rust names:
//!
//! | kernel (rk.cu)         | `RkKernels` method                  | reference                   |
//! |------------------------|-------------------------------------|-----------------------------|
//! | `kutta_stage_point`    | `stage_point`                       | [`self::reference::stage_point`]  |
//! | `kutta_accumulate`     | `accumulate`                        | [`self::reference::accumulate`]   |
//! | `kutta_final_update`   | `final_update`, `final_update_in_place` | [`self::reference::final_update`] |
//! | `kutta_adagrad_d`      | `adagrad_d`                         | [`self::reference::adagrad_d`]    |
//! | `kutta_adagrad_commit` | `adagrad_commit`                    | [`self::reference::adagrad_commit`] |
//! | `kutta_reduce_dnorm2` (+ `kutta_reduce_final`) | `dnorm2`    | [`self::reference::dnorm2`]       |
//! | `kutta_reduce_ddiff2`  | `ddiff2`                            | [`self::reference::ddiff2`]       |
//! | `kutta_reduce_errsum`  | `error_sum`                         | [`self::reference::error_sum`]    |
//! | `kutta_reduce_nonfinite` | `nonfinite_count`                 | [`self::reference::nonfinite_count`] |
//! | `kutta_gather` / `kutta_scatter` | `gather`, `scatter`; `gather_raw`/`scatter_raw` and `segment_table` + `gather_table`/`scatter_table` for raw pointers (candle storage) | [`self::reference::gather`], [`self::reference::scatter`] |

pub mod reference;

#[cfg(feature = "cuda")]
pub mod cuda;

/// `optim::arith::Arith` on the kernels: the RK solver's GPU back end.
#[cfg(feature = "cuda")]
pub mod backend;

/// The kernels against the references on a GPU (`kutta bench kernels`, the kernel tests).
#[cfg(feature = "cuda")]
pub mod check;

pub use reference::MAX_STAGES;
