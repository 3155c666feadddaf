//! What the trainer's trajectory tests share: the real data set, training on N thread-ranks, and
//! reading a checkpoint's tensors.

#![allow(dead_code)]

use kutta_collectives::{Communicator, LocalGroup, SingleProcess};
use kutta_trainer::config::Config;
use kutta_trainer::train::{self, Progress};
use std::path::Path;

pub const FASHION: &str = "/usr/share/datasets/fashion-mnist";

/// The built-in defaults with `base` and then `sets` applied (`--set` syntax), on the real
/// Fashion-MNIST files, which must be installed (`.ci/run` installs them): fail loudly, never skip.
pub fn config(base: &[&str], sets: &[&str]) -> Config {
    assert!(
        Path::new(FASHION).join("train-images-idx3-ubyte.gz").is_file(),
        "Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist"
    );
    let all: Vec<String> = base.iter().chain(sets).map(|s| s.to_string()).collect();
    Config::from_toml_str("", &all).unwrap()
}

/// The f32 tensor `name` (`theta`, `model_state`) of the newest checkpoint in `dir`.
pub fn checkpoint_tensor(dir: &Path, name: &str) -> Vec<f32> {
    let newest = kutta_trainer::checkpoint::list(dir).unwrap().remove(0);
    let bytes = std::fs::read(newest).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensor(name).unwrap().data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// Train on `ranks` thread-ranks (or one plain process when 0) into `out`; rank 0's summary.
pub fn run(cfg: &Config, out: &Path, ranks: usize) -> train::Summary {
    if ranks == 0 {
        return train::train(cfg, out, Progress::Off, &SingleProcess).unwrap();
    }
    std::thread::scope(|s| {
        let hs: Vec<_> = LocalGroup::new(ranks)
            .into_iter()
            .map(|c| s.spawn(move || train::train(cfg, out, Progress::Off, &c as &dyn Communicator)))
            .collect();
        let mut sums: Vec<train::Summary> = hs.into_iter().map(|h| h.join().unwrap().unwrap()).collect();
        sums.remove(0)
    })
}

/// The largest |a − b| relative to the largest |a|.
pub fn max_rel_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = a.iter().map(|x| x.abs() as f64).fold(0.0, f64::max).max(1e-30);
    a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).abs()).fold(0.0, f64::max) / scale
}

/// The bit patterns of `v`, for bit-for-bit comparisons.
pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}
