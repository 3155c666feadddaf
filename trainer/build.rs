//! Build script of kutta-trainer: with the `cuda` feature, compile the RK kernels
//! (`src/kernels/*.cu`) to PTX with nvcc; without it, do nothing (a CPU build needs no toolkit).
//!
//! The kernels are compiled here, at BUILD time, rather than with NVRTC at run time, so that a
//! `--features cuda` build on a machine without a GPU (CI) already fails on a kernel compile
//! error. The PTX targets the virtual architecture `compute_$CUDA_COMPUTE_CAP` (default 90,
//! Hopper); the driver JIT-compiles it for the GPU it finds, which must be of that compute
//! capability or newer, with a driver that knows this toolkit's PTX version (CUDA 13.0 → driver
//! ≥ 580). `src/kernels/cuda.rs` embeds the result with `include_str!`.
//!
//! nvcc is looked up as `$NVCC`, then `$CUDA_ROOT/bin/nvcc` (also `$CUDA_PATH`, `$CUDA_HOME`),
//! then on `PATH`. `scripts/cuda-toolchain` writes an env file that sets these.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The kernel sources, each compiled to `$OUT_DIR/<stem>.ptx`.
const KERNELS: &[&str] = &["src/kernels/rk.cu"];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    for var in ["NVCC", "CUDA_ROOT", "CUDA_PATH", "CUDA_HOME", "CUDA_COMPUTE_CAP", "PATH", "KUTTA_NVCC_FLAGS"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let nvcc = find_nvcc().unwrap_or_else(|| {
        panic!(
            "kutta-trainer: the `cuda` feature compiles src/kernels/*.cu with nvcc, and nvcc was not found \
             ($NVCC, $CUDA_ROOT/bin, $CUDA_PATH/bin, $CUDA_HOME/bin, PATH). Run scripts/cuda-toolchain and \
             `source $HOME/.cache/kutta/cuda-13.0/kutta-cuda-env.sh`, or set NVCC=/path/to/nvcc."
        )
    });
    let cap = env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".to_string());
    let cap = cap.trim().trim_start_matches("sm_").trim_start_matches("compute_").replace('.', "");
    assert!(
        !cap.is_empty() && cap.chars().all(|c| c.is_ascii_alphanumeric()),
        "kutta-trainer: CUDA_COMPUTE_CAP={cap:?} is not a compute capability like 90"
    );
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    for src in KERNELS {
        println!("cargo:rerun-if-changed={src}");
        let stem = Path::new(src).file_stem().unwrap().to_string_lossy().into_owned();
        let out = out_dir.join(format!("{stem}.ptx"));
        let mut cmd = Command::new(&nvcc);
        cmd.arg("--ptx")
            .arg(format!("-arch=compute_{cap}"))
            .args(["-O3", "-std=c++17"])
            // Bitwise agreement with the CPU solver: no a*b+c contracted into an FMA, IEEE
            // division and square root (these two are nvcc's defaults without fast math).
            .args(["--fmad=false", "-prec-div=true", "-prec-sqrt=true", "-ftz=false"])
            .arg("-lineinfo");
        if let Ok(extra) = env::var("KUTTA_NVCC_FLAGS") {
            cmd.args(extra.split_whitespace());
        }
        cmd.arg("-o").arg(&out).arg(src);
        let status = cmd.status().unwrap_or_else(|e| panic!("kutta-trainer: cannot run {} ({e})", nvcc.display()));
        assert!(status.success(), "kutta-trainer: nvcc failed on {src} ({status}); the command was {cmd:?}");
    }
}

fn find_nvcc() -> Option<PathBuf> {
    if let Some(p) = env::var_os("NVCC") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Some(p);
        }
        panic!("kutta-trainer: NVCC={} is not a file", p.display());
    }
    for var in ["CUDA_ROOT", "CUDA_PATH", "CUDA_HOME"] {
        if let Some(root) = env::var_os(var) {
            let p = PathBuf::from(root).join("bin").join("nvcc");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    env::var_os("PATH").and_then(|path| env::split_paths(&path).map(|d| d.join("nvcc")).find(|p| p.is_file()))
}
