//! Checkpoints: one safetensors file holding θ and every optimizer buffer as f32 tensors, with
//! the scalars (step, counters, controller state, data position) as JSON in its metadata and
//! CRC32C checksums of the header and of every tensor (`integrity`): a damaged checkpoint is an
//! error naming the file and the damaged tensor or the header, never loaded.
//!
//! A run folder keeps the last `train.keep_checkpoints` checkpoints, `checkpoint-<step>.safetensors`
//! with the step zero-padded to 8 digits (so `ls` lists the newest last). Each is written to a
//! temporary name, fsynced and renamed, so a crash never leaves a half-written checkpoint; a
//! write that fails (disk full, a file-size limit) removes its temporary file and leaves the
//! previous checkpoints as they were.
//!
//! The data position needs no RNG state: the batch of step n is a pure function of
//! (seed, n, batch size, shuffle, training-set size), all recorded here and checked on resume.

use crate::error::{Error, Result};
use crate::integrity::{self, bytes_to_f32, f32_to_bytes, write_atomic, Verified};
use crate::optim::OptimizerState;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The single checkpoint of run folders written before checkpoints were numbered; still read.
pub const LEGACY_FILE_NAME: &str = "checkpoint.safetensors";
const PREFIX: &str = "checkpoint-";
const SUFFIX: &str = ".safetensors";
const META_KEY: &str = "kutta";
/// The tensor holding the model state (`Checkpoint::model_state`).
const MODEL_STATE: &str = "model_state";
/// 2: with checksums (`integrity`). 1 (no checksums) is still read, unverified, with a warning.
const FORMAT_VERSION: u32 = 2;

/// The file name of the checkpoint after `step` steps.
pub fn file_name(step: u64) -> String {
    format!("{PREFIX}{step:08}{SUFFIX}")
}

/// The step in a checkpoint's file name (`checkpoint-00001000.safetensors` → 1000).
pub fn step_of(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    let digits = name.strip_prefix(PREFIX)?.strip_suffix(SUFFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// kutta's checkpoints in a run folder, newest first; the legacy `checkpoint.safetensors`, if
/// any, comes last.
pub fn list(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut numbered = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = e.map_err(|e| Error::io(dir, e))?.path();
        if let Some(step) = step_of(&path) {
            numbered.push((step, path));
        }
    }
    numbered.sort_by_key(|(step, _)| std::cmp::Reverse(*step));
    let mut out: Vec<PathBuf> = numbered.into_iter().map(|(_, p)| p).collect();
    let legacy = dir.join(LEGACY_FILE_NAME);
    if legacy.is_file() {
        out.push(legacy);
    }
    Ok(out)
}

/// Remove all but the `keep` newest numbered checkpoints of `dir` (never the legacy file);
/// returns what it removed.
pub fn prune(dir: &Path, keep: usize) -> Result<Vec<PathBuf>> {
    let numbered: Vec<PathBuf> = list(dir)?.into_iter().filter(|p| step_of(p).is_some()).collect();
    let mut removed = Vec::new();
    for p in numbered.into_iter().skip(keep.max(1)) {
        std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
        removed.push(p);
    }
    Ok(removed)
}

/// Remove the temporary files (`*.tmp`) a process that died while writing left in `dir`; returns
/// what it removed. Only kutta's own names are touched.
pub fn remove_partial_writes(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut removed = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
        let Some(target) = name.strip_suffix(".tmp") else { continue };
        let ours = step_of(Path::new(target)).is_some()
            || [LEGACY_FILE_NAME, "model.safetensors", "summary.json", "metrics.jsonl"].contains(&target);
        if ours && std::fs::remove_file(&path).is_ok() {
            removed.push(path);
        }
    }
    removed
}

/// The run folder of `kutta train --resume PATH`: PATH itself, or the folder of the checkpoint
/// file PATH names.
pub fn run_folder(path: &Path) -> PathBuf {
    if path.is_file() {
        match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        }
    } else {
        path.to_path_buf()
    }
}

/// Where `kutta train --resume PATH` continues from.
#[derive(Debug)]
pub struct ResumePoint {
    /// The run folder.
    pub dir: PathBuf,
    /// The checkpoint file, verified and loaded into `checkpoint`.
    pub file: PathBuf,
    pub checkpoint: Checkpoint,
    /// Numbered checkpoints newer than `file` (when PATH named an older one): the resumed run
    /// would write over their steps, so the trainer sets them aside first.
    pub newer: Vec<PathBuf>,
}

impl ResumePoint {
    /// PATH is a run folder (continue from its newest checkpoint, which must be intact) or one
    /// checkpoint file in a run folder. A damaged newest checkpoint is an error that names the
    /// newest intact one and the command that continues from it.
    pub fn find(path: &Path) -> Result<ResumePoint> {
        if path.is_file() {
            if step_of(path).is_none() && path.file_name().is_none_or(|n| n != LEGACY_FILE_NAME) {
                return Err(Error::checkpoint(
                    path,
                    "not a checkpoint file (checkpoint-<step>.safetensors): --resume takes a run folder or one of its checkpoints",
                ));
            }
            let dir = run_folder(path);
            let checkpoint = Checkpoint::load(path)?;
            let newer =
                list(&dir)?.into_iter().filter(|p| step_of(p).is_some_and(|s| s > checkpoint.meta.step)).collect();
            return Ok(ResumePoint { dir, file: path.to_path_buf(), checkpoint, newer });
        }
        let dir = path.to_path_buf();
        let all = list(&dir)?;
        let Some(newest) = all.first().cloned() else {
            return Err(Error::checkpoint(
                dir.join(file_name(0).replace("00000000", "*")),
                format!("no checkpoint in {} (none written yet: a run writes one every train.checkpoint_every steps and when it stops)", dir.display()),
            ));
        };
        let damage = match Checkpoint::load(&newest) {
            Ok(checkpoint) => return Ok(ResumePoint { dir, file: newest, checkpoint, newer: Vec::new() }),
            Err(e) => e,
        };
        let intact = all[1..].iter().find_map(|p| Checkpoint::load(p).ok().map(|c| (p.clone(), c.meta.step)));
        let advice = match intact {
            Some((p, step)) => format!(
                "; the newest intact checkpoint is {} (step {step}); continue from it with: kutta train --resume {}",
                p.display(),
                p.display()
            ),
            None if all.len() > 1 => {
                format!("; none of the {} older checkpoints in {} is intact either", all.len() - 1, dir.display())
            }
            None => format!("; it is the only checkpoint in {}", dir.display()),
        };
        Err(damage.context("the newest checkpoint cannot be used").advise(advice))
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub format_version: u32,
    /// Optimizer steps completed; the resumed run continues with step `step`.
    pub step: u64,
    pub grad_evals: u64,
    /// Wall-clock seconds spent training before this checkpoint (summed over resumes).
    pub wall_seconds: f64,
    /// Training time before this checkpoint, evaluation excluded (`MetricsLine::train_s`; 0 in
    /// checkpoints written before it was recorded).
    #[serde(default)]
    pub train_seconds: f64,
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
    /// Updates of the model state so far (batch norm's `num_batches_tracked`); the state itself
    /// is the tensor `model_state` (absent for models without state).
    #[serde(default)]
    pub model_state_updates: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub meta: CheckpointMeta,
    pub theta: Vec<f32>,
    pub optimizer: OptimizerState<f32>,
    /// State outside θ (`model::ModelState`: batch norm's running statistics), flat in the
    /// model's state layout; empty for models without state.
    pub model_state: Vec<f32>,
}

impl Checkpoint {
    pub fn new(meta: CheckpointMeta, theta: Vec<f32>, mut optimizer: OptimizerState<f32>) -> Self {
        let mut meta = meta;
        meta.format_version = FORMAT_VERSION;
        meta.optimizer_scalars = std::mem::take(&mut optimizer.scalars);
        Self { meta, theta, optimizer, model_state: Vec::new() }
    }

    /// With the model state (and its update count in the metadata).
    pub fn with_model_state(mut self, state: &crate::model::ModelState) -> Self {
        self.model_state = state.values.clone();
        self.meta.model_state_updates = state.updates;
        self
    }

    /// The model state this checkpoint holds.
    pub fn model_state(&self) -> crate::model::ModelState {
        crate::model::ModelState { values: self.model_state.clone(), updates: self.meta.model_state_updates }
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let theta_bytes = f32_to_bytes(&self.theta);
        let bufs: Vec<(String, Vec<u8>)> =
            self.optimizer.buffers.iter().map(|(n, b)| (format!("optimizer.{n}"), f32_to_bytes(b))).collect();
        let state_bytes = f32_to_bytes(&self.model_state);
        let mut views = vec![("theta".to_string(), view(&theta_bytes)?)];
        if !self.model_state.is_empty() {
            views.push((MODEL_STATE.to_string(), view(&state_bytes)?));
        }
        for (name, bytes) in &bufs {
            views.push((name.clone(), view(bytes)?));
        }
        let meta = serde_json::to_string(&self.meta).expect("meta serializes");
        let bytes = integrity::serialize(views, HashMap::from([(META_KEY.to_string(), meta)]))
            .map_err(|e| Error::checkpoint(path, format!("cannot serialize: {e}")))?;
        write_atomic(path, &bytes)
    }

    pub fn load(path: &Path) -> Result<Checkpoint> {
        if !path.exists() {
            return Err(Error::checkpoint(path, "not found (no checkpoint was written in this run folder yet?)"));
        }
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let bad = |msg: String| Error::checkpoint(path, msg);
        let verified = integrity::verify(&bytes).map_err(bad)?;
        let (_, header) = SafeTensors::read_metadata(&bytes)
            .map_err(|e| bad(format!("not a valid safetensors file ({e}); corrupt or truncated")))?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("corrupt: {e}")))?;
        let meta_json = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(META_KEY))
            .ok_or_else(|| bad("no kutta metadata: this is not a kutta checkpoint".into()))?;
        let mut meta: CheckpointMeta =
            serde_json::from_str(meta_json).map_err(|e| bad(format!("bad metadata: {e}")))?;
        match (meta.format_version, verified) {
            (1, _) => {
                tracing::warn!("{}: written by an earlier kutta without checksums; loaded unverified", path.display())
            }
            (FORMAT_VERSION, Verified::Intact) => {}
            (FORMAT_VERSION, Verified::Unchecked) => {
                return Err(bad(
                    "the header is damaged: its checksums are missing (every checkpoint of this format carries them)"
                        .into(),
                ))
            }
            (v, _) => return Err(bad(format!("format version {v} (this kutta reads 1 and {FORMAT_VERSION})"))),
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
        let model_state = if st.names().contains(&MODEL_STATE) { read(MODEL_STATE)? } else { Vec::new() };
        let mut names: Vec<&str> = st.names().into_iter().filter(|n| *n != "theta" && *n != MODEL_STATE).collect();
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
        Ok(Checkpoint { meta, theta, optimizer, model_state })
    }
}

fn view(bytes: &[u8]) -> Result<TensorView<'_>> {
    TensorView::new(Dtype::F32, vec![bytes.len() / 4], bytes).map_err(|e| Error::internal(format!("tensor view: {e}")))
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
            train_seconds: 1.25,
            best_test_accuracy: Some(0.75),
            optimizer: "rk(rk4)".into(),
            param_count: 3,
            seed: 7,
            batch_size: 16,
            shuffle: true,
            train_samples: 100,
            optimizer_scalars: Default::default(),
            model_state_updates: 0,
        };
        let state = crate::model::ModelState { values: vec![0.25, 3.0], updates: 41 };
        Checkpoint::new(meta, vec![1.0, 1.0 / 3.0, -7.5e-12], opt).with_model_state(&state)
    }

    #[test]
    fn round_trip_is_exact() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(file_name(42));
        let c = sample();
        c.save(&path).unwrap();
        let back = Checkpoint::load(&path).unwrap();
        assert_eq!(back.theta, c.theta);
        assert_eq!(back.optimizer.buffers, c.optimizer.buffers);
        assert_eq!(back.optimizer.scalars.get("h_ec").unwrap().as_f64().unwrap(), 0.1 + 0.2);
        assert_eq!(back.meta.step, 42);
        assert!(!path.with_extension("safetensors.tmp").exists());
        assert_eq!(integrity::verify(&std::fs::read(&path).unwrap()), Ok(Verified::Intact));
    }

    #[test]
    fn missing_and_corrupt_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(file_name(42));
        let e = Checkpoint::load(&path).unwrap_err().to_string();
        assert!(e.contains("not found"), "{e}");
        sample().save(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 5]).unwrap();
        let e = Checkpoint::load(&path).unwrap_err().to_string();
        assert!(e.contains(&file_name(42)), "{e}");
        let mut flipped = bytes.clone();
        let n = flipped.len();
        flipped[n - 2] ^= 4;
        std::fs::write(&path, &flipped).unwrap();
        let e = Checkpoint::load(&path).unwrap_err().to_string();
        assert!(e.contains("tensor `theta` is damaged"), "{e}");
        std::fs::write(&path, b"garbage").unwrap();
        assert!(Checkpoint::load(&path).is_err());
    }

    #[test]
    fn names_list_prune_and_resume_points() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert_eq!(file_name(1000), "checkpoint-00001000.safetensors");
        assert_eq!(step_of(Path::new("x/checkpoint-123456789.safetensors")), Some(123456789));
        assert_eq!(step_of(Path::new("checkpoint-12.safetensors.tmp")), None);
        assert_eq!(step_of(Path::new("checkpoint-.safetensors")), None);
        let e = ResumePoint::find(d).unwrap_err().to_string();
        assert!(e.contains("no checkpoint"), "{e}");
        std::fs::write(d.join("config.toml"), "").unwrap();
        let e = ResumePoint::find(&d.join("config.toml")).unwrap_err().to_string();
        assert!(e.contains("config.toml") && e.contains("not a checkpoint file"), "{e}");
        std::fs::remove_file(d.join("config.toml")).unwrap();
        let mut c = sample();
        for step in [3u64, 6, 9, 12] {
            c.meta.step = step;
            c.save(&d.join(file_name(step))).unwrap();
        }
        std::fs::write(d.join("checkpoint-00000015.safetensors.tmp"), b"partial").unwrap();
        std::fs::write(d.join("notes.tmp"), b"mine").unwrap();
        assert_eq!(remove_partial_writes(d).len(), 1);
        assert!(d.join("notes.tmp").exists(), "only kutta's own temporary files are removed");
        let steps = |v: Vec<PathBuf>| v.iter().map(|p| step_of(p).unwrap()).collect::<Vec<_>>();
        assert_eq!(steps(list(d).unwrap()), [12, 9, 6, 3]);
        assert_eq!(steps(prune(d, 3).unwrap()), [3]);
        assert_eq!(steps(list(d).unwrap()), [12, 9, 6]);
        let r = ResumePoint::find(d).unwrap();
        assert_eq!((r.checkpoint.meta.step, r.newer.len()), (12, 0));
        let r = ResumePoint::find(&d.join(file_name(6))).unwrap();
        assert_eq!((r.checkpoint.meta.step, steps(r.newer)), (6, vec![12, 9]));
        // The newest damaged: the error names it, the damage, and the newest intact one.
        let newest = d.join(file_name(12));
        let mut bytes = std::fs::read(&newest).unwrap();
        let n = bytes.len();
        bytes[n - 1] ^= 0x10;
        std::fs::write(&newest, &bytes).unwrap();
        let e = ResumePoint::find(d).unwrap_err().to_string();
        assert!(e.contains(&file_name(12)) && e.contains("damaged"), "{e}");
        assert!(e.contains(&format!("kutta train --resume {}", d.join(file_name(9)).display())), "{e}");
    }
}
