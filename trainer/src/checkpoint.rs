//! Checkpoints: one safetensors file holding θ and every optimizer buffer as f32 tensors, with
//! the scalars (step, counters, controller state, data position) as JSON in its metadata. One
//! file, written to a temporary name, fsynced and renamed, so a crash never leaves a half-written
//! checkpoint: the previous one stays until the new one is complete.
//!
//! The data position needs no RNG state: the batch of step n is a pure function of
//! (seed, n, batch size, shuffle, training-set size), all recorded here and checked on resume.

use crate::error::{Error, Result};
use crate::optim::OptimizerState;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

pub const FILE_NAME: &str = "checkpoint.safetensors";
const META_KEY: &str = "kutta";
const FORMAT_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub format_version: u32,
    /// Optimizer steps completed; the resumed run continues with step `step`.
    pub step: u64,
    pub grad_evals: u64,
    /// Wall-clock seconds spent training before this checkpoint (summed over resumes).
    pub wall_seconds: f64,
    pub best_test_accuracy: Option<f64>,
    pub optimizer: String,
    pub param_count: usize,
    /// The data position: what the batch of step n depends on.
    pub seed: u64,
    pub batch_size: usize,
    pub shuffle: bool,
    pub train_samples: usize,
    /// The optimizer's scalar state.
    pub optimizer_scalars: serde_json::Map<String, serde_json::Value>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub meta: CheckpointMeta,
    pub theta: Vec<f32>,
    pub optimizer: OptimizerState<f32>,
}

impl Checkpoint {
    pub fn new(meta: CheckpointMeta, theta: Vec<f32>, mut optimizer: OptimizerState<f32>) -> Self {
        let mut meta = meta;
        meta.format_version = FORMAT_VERSION;
        meta.optimizer_scalars = std::mem::take(&mut optimizer.scalars);
        Self { meta, theta, optimizer }
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let theta_bytes = f32_to_bytes(&self.theta);
        let bufs: Vec<(String, Vec<u8>)> =
            self.optimizer.buffers.iter().map(|(n, b)| (format!("optimizer.{n}"), f32_to_bytes(b))).collect();
        let mut views = vec![("theta".to_string(), view(&theta_bytes)?)];
        for (name, bytes) in &bufs {
            views.push((name.clone(), view(bytes)?));
        }
        let meta = serde_json::to_string(&self.meta).expect("meta serializes");
        let bytes = safetensors::serialize(views, Some(HashMap::from([(META_KEY.to_string(), meta)])))
            .map_err(|e| Error::checkpoint(path, format!("cannot serialize: {e}")))?;
        write_atomic(path, &bytes)
    }

    pub fn load(path: &Path) -> Result<Checkpoint> {
        if !path.exists() {
            return Err(Error::checkpoint(path, "not found (no checkpoint was written in this run folder yet?)"));
        }
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let bad = |msg: String| Error::checkpoint(path, msg);
        let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(format!("not a valid safetensors file ({e}); corrupt or truncated")))?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("corrupt: {e}")))?;
        let meta_json = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(META_KEY))
            .ok_or_else(|| bad("no kutta metadata: this is not a kutta checkpoint".into()))?;
        let mut meta: CheckpointMeta = serde_json::from_str(meta_json).map_err(|e| bad(format!("bad metadata: {e}")))?;
        if meta.format_version != FORMAT_VERSION {
            return Err(bad(format!("format version {} (this kutta reads {FORMAT_VERSION})", meta.format_version)));
        }
        let read = |name: &str| -> Result<Vec<f32>> {
            let t = st.tensor(name).map_err(|_| bad(format!("tensor `{name}` missing")))?;
            if t.dtype() != Dtype::F32 {
                return Err(bad(format!("tensor `{name}` has dtype {:?}, expected F32", t.dtype())));
            }
            Ok(bytes_to_f32(t.data()))
        };
        let theta = read("theta")?;
        if theta.len() != meta.param_count {
            return Err(bad(format!("theta has {} entries but the metadata says {}", theta.len(), meta.param_count)));
        }
        let mut names: Vec<&str> = st.names().into_iter().filter(|n| *n != "theta").collect();
        names.sort();
        let mut optimizer = OptimizerState::default();
        for n in names {
            let short = n.strip_prefix("optimizer.").ok_or_else(|| bad(format!("unexpected tensor `{n}`")))?;
            let b = read(n)?;
            if b.len() != theta.len() {
                return Err(bad(format!("optimizer buffer `{short}` has {} entries, θ has {}", b.len(), theta.len())));
            }
            optimizer.buffers.push((short.to_string(), b));
        }
        optimizer.scalars = std::mem::take(&mut meta.optimizer_scalars);
        Ok(Checkpoint { meta, theta, optimizer })
    }
}

fn view(bytes: &[u8]) -> Result<TensorView<'_>> {
    TensorView::new(Dtype::F32, vec![bytes.len() / 4], bytes).map_err(|e| Error::Other(format!("tensor view: {e}")))
}

pub fn f32_to_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn bytes_to_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// Write `bytes` to `path` atomically: a temporary file in the same directory, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!(
        "{}.tmp",
        path.extension().and_then(|e| e.to_str()).unwrap_or("")
    ));
    let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
    f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Checkpoint {
        let mut opt = OptimizerState::default();
        opt.buffers.push(("rk.m".into(), vec![0.5, -1.25, f32::MIN_POSITIVE]));
        opt.scalars.insert("h_ec".into(), serde_json::json!(0.1 + 0.2));
        let meta = CheckpointMeta {
            format_version: 0,
            step: 42,
            grad_evals: 168,
            wall_seconds: 1.5,
            best_test_accuracy: Some(0.75),
            optimizer: "rk(rk4)".into(),
            param_count: 3,
            seed: 7,
            batch_size: 16,
            shuffle: true,
            train_samples: 100,
            optimizer_scalars: Default::default(),
        };
        Checkpoint::new(meta, vec![1.0, 1.0 / 3.0, -7.5e-12], opt)
    }

    #[test]
    fn round_trip_is_exact() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let c = sample();
        c.save(&path).unwrap();
        let back = Checkpoint::load(&path).unwrap();
        assert_eq!(back.theta, c.theta);
        assert_eq!(back.optimizer.buffers, c.optimizer.buffers);
        assert_eq!(back.optimizer.scalars.get("h_ec").unwrap().as_f64().unwrap(), 0.1 + 0.2);
        assert_eq!(back.meta.step, 42);
        assert!(!path.with_extension("safetensors.tmp").exists());
    }

    #[test]
    fn missing_and_corrupt_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let e = Checkpoint::load(&path).unwrap_err().to_string();
        assert!(e.contains("not found"), "{e}");
        sample().save(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 5]).unwrap();
        let e = Checkpoint::load(&path).unwrap_err().to_string();
        assert!(e.contains(FILE_NAME), "{e}");
        std::fs::write(&path, b"garbage").unwrap();
        assert!(Checkpoint::load(&path).is_err());
    }
}
