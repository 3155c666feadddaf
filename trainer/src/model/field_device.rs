//! The device path, `ModelField::eval_device` (feature `cuda`): θ and the gradient stay on the
//! GPU as flat buffers in the layout of `Model::layout()`; the forward/backward loop is the one
//! `eval` runs (`backward_passes`), with a device gradient sink.
//!
//! - θ → parameters: one cached `Var` per layout tensor (zeros, contiguous, on the model's device,
//!   created at the first call; `set_device` drops them) whose storage ONE `scatter_table` launch
//!   overwrites with θ at every eval; the segment table (the Vars' device addresses, stable while
//!   they live) is uploaded once. Writing into a Var's storage in place is what candle's own
//!   `Var::set` does; it is sound here because nothing reads the old values afterwards: the
//!   previous eval's graph, gradient store and gradient tensors are all dropped when it returns
//!   (only the Vars themselves are kept, and nothing outside this field ever sees them), and every
//!   kernel that read the old values was enqueued before the scatter on the same stream.
//! - gradients: `DeviceGrads` keeps each parameter's gradient tensor on the device (detached, so
//!   no graph outlives its backward pass) and adds micro-batch k > 0 into it with candle's f32 add,
//!   the host sink's `out + g` bit for bit; after the last backward pass ONE `gather_raw` launch
//!   copies them into the flat `grad` (after a stream memset when some parameter received no
//!   gradient).
//! - one stream: the kernels must launch on candle's stream of the model's device
//!   (`RkKernels::new(cuda_device.cuda_stream())`, candle's per-thread default stream; call from
//!   the thread that runs the model), so stream order alone puts the scatter before the forward
//!   pass and the gather after the backward pass.

use std::sync::Arc;

use candle_core::{DType, Device, Layout, Storage, Tensor, Var};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, SyncOnDrop};

use super::{GradSink, ModelField};
use crate::error::{Error, Result};
use crate::kernels::cuda::{KernelError, RkKernels, Segment, SegmentTable};
use crate::layout::{ParamLayout, ParamSpec};

fn err<T>(msg: impl std::fmt::Display) -> Result<T> {
    Err(Error::internal(format!("ModelField::eval_device: {msg}")))
}

/// The parameter tensors `eval_device` computes with, and where θ goes into them.
pub(super) struct DeviceParams {
    vars: Vec<Var>,
    /// Var j's storage ← θ[layout.params[j].range()].
    table: SegmentTable,
}

impl DeviceParams {
    fn new(layout: &ParamLayout, device: &Device, stream: &CudaStream, kernels: &RkKernels) -> Result<Self> {
        let vars = layout
            .params
            .iter()
            .map(|s| Var::zeros(s.shape.as_slice(), DType::F32, device))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let storages: Vec<_> = vars.iter().map(|v| v.as_tensor().storage_and_layout()).collect();
        let mut segs = Vec::with_capacity(vars.len());
        for ((storage, l), spec) in storages.iter().zip(&layout.params) {
            segs.push(segment(storage, l, spec, stream)?.0);
        }
        let table = kernels.segment_table(&segs, layout.len(), true)?;
        drop(storages);
        Ok(Self { vars, table })
    }
}

/// The device segment of parameter `spec` in tensor storage `(storage, l)` (checked:
/// contiguous f32 on a CUDA device of `stream`'s context, spec.numel() values), and the guard
/// that records the access on `stream` when dropped.
fn segment<'s>(
    storage: &'s Storage,
    l: &Layout,
    spec: &ParamSpec,
    stream: &'s CudaStream,
) -> Result<(Segment, SyncOnDrop<'s>)> {
    let name = &spec.name;
    let Storage::Cuda(cs) = storage else {
        return err(format!("parameter {name} is not on a CUDA device"));
    };
    let slice = cs.as_cuda_slice::<f32>()?;
    if slice.stream().context() != stream.context() {
        return err(format!("parameter {name} lives in another CUDA context than the kernels"));
    }
    let Some((start, end)) = l.contiguous_offsets() else {
        return err(format!("parameter {name}: the tensor is not contiguous"));
    };
    if end - start != spec.numel() || end > slice.len() {
        return err(format!(
            "parameter {name}: a tensor of {} values at {start}..{end} of a buffer of {}, the layout has {}",
            end - start,
            slice.len(),
            spec.numel()
        ));
    }
    let (base, sync) = slice.device_ptr(stream);
    let ptr = base + (start * std::mem::size_of::<f32>()) as u64;
    Ok((Segment { ptr, offset: spec.offset as u64, len: spec.numel() as u64 }, sync))
}

/// The device sink: per-parameter gradient tensors, summed over the micro-batches.
struct DeviceGrads(Vec<Option<Tensor>>);

impl GradSink for DeviceGrads {
    fn put(&mut self, i: usize, g: &Tensor, accumulate: bool) -> Result<()> {
        // Detached: a kept gradient must not keep its backward pass's graph alive.
        let g = g.detach();
        let slot = &mut self.0[i];
        *slot = Some(match (slot.take(), accumulate) {
            // f32 adds in the host sink's order (out + g): bit-identical.
            (Some(sum), true) => (sum + g)?,
            // The host adds to the zeros it wrote for the first micro-batch.
            (None, true) => (g.zeros_like()? + g)?,
            (_, false) => g,
        });
        Ok(())
    }

    fn zero(&mut self, i: usize) -> Result<()> {
        self.0[i] = None;
        Ok(())
    }
}

impl DeviceGrads {
    /// Every gradient into its range of `grad` with one gather launch; zeros where a
    /// parameter received none.
    fn gather_into(
        self,
        kernels: &RkKernels,
        stream: &Arc<CudaStream>,
        layout: &ParamLayout,
        grad: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let mut parts = Vec::with_capacity(self.0.len());
        for (spec, g) in layout.params.iter().zip(self.0) {
            if let Some(g) = g {
                parts.push((spec, g.contiguous()?));
            }
        }
        if parts.len() < layout.params.len() {
            stream.memset_zeros(grad).map_err(KernelError::from)?;
        }
        let storages: Vec<_> = parts.iter().map(|(_, t)| t.storage_and_layout()).collect();
        let mut segs = Vec::with_capacity(parts.len());
        let mut syncs = Vec::with_capacity(parts.len());
        for ((spec, _), (storage, l)) in parts.iter().zip(&storages) {
            let (seg, sync) = segment(storage, l, spec, stream)?;
            segs.push(seg);
            syncs.push(sync);
        }
        // SAFETY: each segment addresses spec.numel() f32 of a gradient tensor's device
        // storage (checked by `segment`), kept alive by `parts` until the launch is enqueued
        // (their frees afterwards are ordered on the same stream); candle wrote them on this
        // stream, which the launch follows in stream order.
        unsafe { kernels.gather_raw(grad, &segs)? };
        drop(syncs);
        Ok(())
    }
}

impl ModelField<'_> {
    /// g(θ) with θ and the gradient as flat device buffers (the layout of `Model::layout()`),
    /// on the model's CUDA device (`set_device`). The same loss and gradient as `eval` (the
    /// host path): the same forward/backward passes, micro-batches and recomputation.
    /// `kernels` must launch on candle's stream of that device
    /// (`RkKernels::new(cuda_device.cuda_stream())`); a CPU device, another context or
    /// another stream, buffers of the wrong length or context are errors.
    pub fn eval_device(
        &mut self,
        kernels: &RkKernels,
        theta: &CudaSlice<f32>,
        grad: &mut CudaSlice<f32>,
    ) -> Result<f64> {
        let stream = self.device_stream(kernels)?;
        for (what, buf) in [("θ", theta), ("the gradient buffer", &*grad)] {
            if buf.stream().context() != stream.context() {
                return err(format!("{what} lives in another CUDA context than the model"));
            }
        }
        if !self.ready(theta.len(), grad.len())? {
            // An empty slice of the global batch contributes nothing to the sums.
            stream.memset_zeros(grad).map_err(KernelError::from)?;
            return Ok(0.0);
        }
        let layout = self.model.layout();
        if self.device_params.is_none() {
            self.device_params = Some(DeviceParams::new(layout, &self.device, &stream, kernels)?);
        }
        let Some(params) = &self.device_params else { return err("no device parameters") };
        // SAFETY: the table addresses the cached Vars' storage (checked contiguous f32 of
        // the layout's sizes when built), alive as long as `self.device_params`; on this one
        // stream every earlier read of it (the previous eval) runs before this write, and no
        // tensor reading the old values survives the previous eval (see the module notes).
        unsafe { kernels.scatter_table(theta, &params.table)? };
        let vars = params.vars.clone();
        let mut sink = DeviceGrads(vec![None; vars.len()]);
        let loss = self.backward_passes(&vars, &mut sink)?;
        sink.gather_into(kernels, &stream, layout, grad)?;
        Ok(loss)
    }

    /// candle's stream on the model's device, checked to be the one `kernels` launch on.
    fn device_stream(&self, kernels: &RkKernels) -> Result<Arc<CudaStream>> {
        let Ok(dev) = self.device.as_cuda_device() else {
            return err(format!(
                "the model runs on {:?}, not on a CUDA device (ModelField::set_device)",
                self.device.location()
            ));
        };
        let stream = dev.cuda_stream();
        if stream.context() != kernels.context() {
            return err("the RK kernels live in another CUDA context than the model's device");
        }
        if std::thread::current().id() != kernels.owner() {
            return err("the RK kernels were built on another thread; candle's CUDA stream is per thread, so \
                 the model and the kernels must run on the thread that built them");
        }
        if *stream != **kernels.stream() {
            return err("the RK kernels launch on another CUDA stream than candle's on the model's device \
                 (build them with RkKernels::new(cuda_device.cuda_stream()))");
        }
        Ok(stream)
    }
}
