//! Models: stateless architectures over the one flat parameter buffer θ.
//!
//! A model owns only its `ParamLayout` (name, shape and offset of each tensor inside θ) and its
//! architecture; weights never live in it. Every call gets the weights as candle tensors built
//! from slices of θ, in layout order: `ModelField` makes them `Var`s to get a gradient,
//! `evaluate` makes them plain tensors. That keeps θ, the stage gradients, G and m in one layout
//! the optimizers can treat as flat slices (STYLE.md habit 1).
//!
//! This module also holds what every model shares: fresh weights (`init_params`), weights files
//! (`load_safetensors` / `save_safetensors`), the factory the config calls (`build`), and the
//! layer ops with their own backward passes: `input_linear`, which never computes a gradient with
//! respect to the input images (candle's matmul backward always does; for the default MLP that is
//! the 784×500 product, a fifth of the backward flops, thrown away), and `conv2d`, which skips it too and computes the
//! input gradient of hidden convs as a convolution rather than with candle's slow CPU
//! `conv_transpose2d`.

pub mod cnn;
pub mod field;
pub mod mlp;

pub use field::{evaluate, evaluate_on, ModelField};

use std::path::Path;

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp2, CustomOp3, Layout, MetalStorage, Shape, Storage, Tensor,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::error::{Error, Result};
use crate::layout::ParamLayout;

pub trait Model: Send + Sync {
    fn layout(&self) -> &ParamLayout;
    /// Logits [batch, num_classes] from params (candle tensors in layout order, shapes as in the
    /// layout) and input x [batch, C*H*W] (f32). The input never receives a gradient.
    /// It is the chain of the model's segments, the unit of activation recomputation.
    fn forward(&self, params: &[Tensor], x: &Tensor) -> Result<Tensor> {
        check_params(self.layout(), params)?;
        let mut h = x.clone();
        for k in 0..self.segments() {
            h = self.forward_segment(params, k, &h)?;
        }
        Ok(h)
    }
    /// How many segments the forward pass is cut into (a layer or a conv block each). With
    /// activation recomputation only the segment boundaries are kept through the backward pass
    /// (`ModelField::set_recompute`).
    fn segments(&self) -> usize;
    /// Segment `k` applied to `h` (the input x for k = 0, else segment k − 1's output). `params`
    /// is the whole list (checked by `forward`); segment 0 checks its input's shape.
    fn forward_segment(&self, params: &[Tensor], k: usize, h: &Tensor) -> Result<Tensor>;
    /// One line for logs, e.g. "mlp 784-500-500-500-10 (ReLU), 898510 params".
    fn describe(&self) -> String;
}

/// Build the model the config names. `kind` is "mlp" (`hidden` = the hidden widths, e.g.
/// `mlp::DEFAULT_HIDDEN`) or "cnn" (`hidden` = the two conv filter counts, e.g.
/// `cnn::DEFAULT_FILTERS`); `image_shape` is (C, H, W) of one sample.
pub fn build(
    kind: &str,
    hidden: &[usize],
    image_shape: [usize; 3],
    num_classes: usize,
) -> Result<Box<dyn Model>> {
    if image_shape.contains(&0) || num_classes == 0 {
        return Err(Error::Other(format!(
            "model: cannot build a model for images of shape {image_shape:?} \
             and {num_classes} classes"
        )));
    }
    if hidden.contains(&0) {
        return Err(Error::config(
            "model.hidden",
            format!("widths must be positive, got {hidden:?}"),
        ));
    }
    match kind {
        "mlp" => {
            let input = image_shape.iter().product();
            Ok(Box::new(mlp::Mlp::new(input, hidden, num_classes)))
        }
        "cnn" => match hidden {
            &[f0, f1] => Ok(Box::new(cnn::Cnn::new(image_shape, [f0, f1], num_classes))),
            _ => Err(Error::config(
                "model.hidden",
                format!(
                    "the cnn takes exactly two filter counts (the paper's: {:?}), got {hidden:?}",
                    cnn::DEFAULT_FILTERS
                ),
            )),
        },
        other => Err(Error::config(
            "model.kind",
            format!("unknown model `{other}`; expected \"mlp\" or \"cnn\""),
        )),
    }
}

/// jax.nn.initializers.truncated_normal's correction: the standard deviation of a standard normal
/// truncated to [−2, 2]. Dividing by it makes the truncated draw's variance exactly 1.
const TRUNCATED_NORMAL_STD: f64 = 0.879_625_661_034_239_8;

/// Fresh weights from the seed, deterministic (`ChaCha8Rng::seed_from_u64(seed)`, tensors drawn in
/// layout order).
///
/// The init is flax's default, since the paper's models are flax models: every weight (a tensor of
/// rank ≥ 2, shape [out, in, ...]) is LeCun normal with variance 1/fan_in, fan_in = the product of
/// all dims but the first (`in` for a linear layer, in_ch·kh·kw for a conv); biases (rank 1) are 0.
/// Like jax's `lecun_normal` (variance_scaling(1, "fan_in", "truncated_normal")), the normal is
/// truncated at ±2 standard deviations and rescaled so that the variance is still exactly 1/fan_in:
/// no weight exceeds 2/(0.8796·√fan_in). (A plain untruncated N(0, 1/fan_in) would differ only in
/// its rare large draws; we follow flax so that runs compare with the paper's.)
pub fn init_params(model: &dyn Model, seed: u64) -> Vec<f32> {
    let layout = model.layout();
    let mut theta = vec![0.0f32; layout.len()];
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for spec in &layout.params {
        if spec.shape.len() < 2 {
            continue; // a bias: zeros
        }
        let fan_in: usize = spec.shape[1..].iter().product();
        let std = (1.0 / fan_in.max(1) as f64).sqrt() / TRUNCATED_NORMAL_STD;
        for w in &mut theta[spec.range()] {
            let z = loop {
                let z: f64 = StandardNormal.sample(&mut rng);
                if z.abs() <= 2.0 {
                    break z;
                }
            };
            *w = (z * std) as f32;
        }
    }
    theta
}

/// Load initial weights from a safetensors file, by tensor name. Every layout tensor must be
/// present with the layout's shape; F32 is taken as is, F64/F16/BF16 are converted to f32. Extra
/// tensors are an error (they mean the file is for another model), and so are non-finite values.
/// A file kutta wrote is verified against its checksums first (`integrity`): damage is an error
/// naming the tensor or the header; a file from another tool (no checksums) loads unverified.
pub fn load_safetensors(model: &dyn Model, path: &Path) -> Result<Vec<f32>> {
    let layout = model.layout();
    let bytes = std::fs::read(path)
        .map_err(|e| Error::checkpoint(path, format!("cannot read weights file: {e}")))?;
    match crate::integrity::verify(&bytes).map_err(|msg| Error::checkpoint(path, msg))? {
        crate::integrity::Verified::Intact => {}
        crate::integrity::Verified::Unchecked => tracing::info!(
            "{}: no kutta checksums (written by another tool or an earlier kutta); loaded unverified",
            path.display()
        ),
    }
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::checkpoint(path, format!("not a valid safetensors file: {e}")))?;

    let missing: Vec<&str> = layout
        .params
        .iter()
        .map(|p| p.name.as_str())
        .filter(|name| st.tensor(name).is_err())
        .collect();
    if !missing.is_empty() {
        return Err(Error::checkpoint(
            path,
            format!("missing tensor(s) {} needed by {}", quoted(&missing), model.describe()),
        ));
    }
    let mut extra: Vec<&str> =
        st.names().into_iter().filter(|name| layout.get(name).is_none()).collect();
    if !extra.is_empty() {
        extra.sort_unstable();
        return Err(Error::checkpoint(
            path,
            format!(
                "unexpected tensor(s) {} that {} does not have",
                quoted(&extra),
                model.describe()
            ),
        ));
    }

    let mut theta = vec![0.0f32; layout.len()];
    for spec in &layout.params {
        let view = st.tensor(&spec.name).map_err(|e| Error::checkpoint(path, e.to_string()))?;
        if view.shape() != spec.shape.as_slice() {
            return Err(Error::checkpoint(
                path,
                format!(
                    "tensor `{}` has shape {:?}, the model needs {:?}",
                    spec.name,
                    view.shape(),
                    spec.shape
                ),
            ));
        }
        let out = &mut theta[spec.range()];
        decode_f32(view.dtype(), view.data(), out)
            .map_err(|msg| Error::checkpoint(path, format!("tensor `{}`: {msg}", spec.name)))?;
        if let Some(i) = out.iter().position(|v| !v.is_finite()) {
            return Err(Error::checkpoint(
                path,
                format!(
                    "tensor `{}` holds a non-finite value ({}) at flat index {i}",
                    spec.name, out[i]
                ),
            ));
        }
    }
    Ok(theta)
}

/// Write θ as a safetensors file, one F32 tensor per layout entry (names and shapes from the
/// layout), atomically: the bytes go to `<path>.tmp`, are synced, and the file is renamed over
/// `path`, so a crash never leaves a half-written weights file under the real name. The file
/// carries CRC32C checksums of its header and tensors in its metadata (`integrity`).
pub fn save_safetensors(layout: &ParamLayout, theta: &[f32], path: &Path) -> Result<()> {
    if theta.len() != layout.len() {
        return Err(Error::checkpoint(
            path,
            format!("θ has {} values but the layout has {}", theta.len(), layout.len()),
        ));
    }
    let bytes = crate::checkpoint::f32_to_bytes(theta);
    let views = layout
        .params
        .iter()
        .map(|p| {
            let data = &bytes[p.offset * 4..(p.offset + p.numel()) * 4];
            TensorView::new(Dtype::F32, p.shape.clone(), data)
                .map(|view| (p.name.clone(), view))
                .map_err(|e| Error::checkpoint(path, format!("tensor `{}`: {e}", p.name)))
        })
        .collect::<Result<Vec<_>>>()?;
    let buffer = crate::integrity::serialize(views, Default::default())
        .map_err(|e| Error::checkpoint(path, format!("cannot serialize: {e}")))?;
    crate::checkpoint::write_atomic(path, &buffer)
}

fn quoted(names: &[&str]) -> String {
    names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
}

/// Decode little-endian `data` of type `dtype` into `out` (same element count, checked).
fn decode_f32(dtype: Dtype, data: &[u8], out: &mut [f32]) -> std::result::Result<(), String> {
    let width = match dtype {
        Dtype::F32 => 4,
        Dtype::F64 => 8,
        Dtype::F16 | Dtype::BF16 => 2,
        other => return Err(format!("dtype {other:?} is not a float type (F32, F64, F16, BF16)")),
    };
    if data.len() != out.len() * width {
        return Err(format!("{} bytes for {} values of {dtype:?}", data.len(), out.len()));
    }
    let chunks = data.chunks_exact(width);
    match dtype {
        Dtype::F32 => {
            for (o, c) in out.iter_mut().zip(chunks) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        Dtype::F64 => {
            for (o, c) in out.iter_mut().zip(chunks) {
                *o = f64::from_le_bytes(c.try_into().expect("8-byte chunk")) as f32;
            }
        }
        Dtype::F16 => {
            for (o, c) in out.iter_mut().zip(chunks) {
                *o = half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        Dtype::BF16 => {
            for (o, c) in out.iter_mut().zip(chunks) {
                // bf16 is the top half of an f32.
                *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
            }
        }
        _ => unreachable!("rejected above"),
    }
    Ok(())
}

/// Check that `params` match the layout: one tensor per entry, same shapes.
pub(crate) fn check_params(layout: &ParamLayout, params: &[Tensor]) -> Result<()> {
    if params.len() != layout.params.len() {
        return Err(Error::Other(format!(
            "model: got {} parameter tensors, the layout has {}",
            params.len(),
            layout.params.len()
        )));
    }
    for (spec, t) in layout.params.iter().zip(params) {
        if t.dims() != spec.shape.as_slice() {
            return Err(Error::Other(format!(
                "model: tensor `{}` has shape {:?}, the layout says {:?}",
                spec.name,
                t.dims(),
                spec.shape
            )));
        }
    }
    Ok(())
}

/// Copy (or, with `accumulate`, add) the f32 values of `t`, in row-major order, into `out`.
/// A contiguous CPU tensor is read in place, with no intermediate Vec.
pub(crate) fn tensor_into_slice(t: &Tensor, out: &mut [f32], accumulate: bool) -> Result<()> {
    if t.elem_count() != out.len() {
        return Err(Error::Other(format!(
            "model: tensor of shape {:?} copied into a buffer of {} values",
            t.dims(),
            out.len()
        )));
    }
    let write = |src: &[f32], out: &mut [f32]| {
        if accumulate {
            out.iter_mut().zip(src).for_each(|(o, s)| *o += s);
        } else {
            out.copy_from_slice(src);
        }
    };
    {
        let (storage, layout) = t.storage_and_layout();
        if let (Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets()) {
            write(&cpu.as_slice::<f32>()?[start..end], out);
            return Ok(());
        }
    }
    let values = t.flatten_all()?.to_vec1::<f32>()?;
    write(&values, out);
    Ok(())
}

/// y = x·wᵀ for the first layer: x [batch, in] (the input), w [out, in]. In the backward pass
/// only w gets a gradient (gᵀ·x); candle's matmul backward would also form g·w for x.
pub(crate) fn input_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let x = x.detach();
    let value = x.matmul(&w.detach().t()?)?;
    with_param_grad(value, w, move |g| g.t()?.matmul(&x))
}

/// 2-D convolution x [batch, C, H, W] ⊛ w [out, C, k, k], stride 1, dilation 1, zero padding
/// `padding` < k (so "same" is padding (k − 1)/2), with its own backward pass:
/// - the input gradient is a convolution of g with the spatially flipped, channel-transposed
///   kernel, padding k − 1 − padding. candle's conv backward uses its CPU `conv_transpose2d`
///   instead, which is ~15× slower than the forward conv at the CNN's sizes (650 ms against
///   45 ms for 64×20×28×28 → 10 channels), so it dominated the CNN's whole gradient evaluation;
/// - the input gradient is skipped when x does not track gradients (the input images), and the
///   weight gradient when w does not.
pub(crate) fn conv2d(x: &Tensor, w: &Tensor, padding: usize) -> Result<Tensor> {
    let (_, _, kh, kw) = w.dims4()?;
    if kh != kw || padding >= kh {
        return Err(Error::Other(format!(
            "model: conv2d needs a square kernel and padding < kernel size, \
             got {kh}×{kw} with padding {padding}"
        )));
    }
    let value = x.detach().conv2d(&w.detach(), padding, 1, 1, 1)?;
    if !x.track_op() && !w.track_op() {
        return Ok(value);
    }
    Ok(value.apply_op3(x, w, Conv2dBackward { padding })?)
}

/// The forward pass of the custom ops below, on every backend: a copy of the first argument (the
/// value, computed beforehand from detached tensors). The copy is one activation-sized pass,
/// small next to the matmul or conv that produced the value. The ops differ only in `bwd`; the
/// rest of their impls is what `CustomOp2`/`CustomOp3` require: one method per backend and arity,
/// each with its own storage type (the defaults of `cuda_fwd` and `metal_fwd` are errors).
fn pass_through<S: BackendStorage>(s1: &S, l1: &Layout) -> candle_core::Result<(S, Shape)> {
    Ok((s1.affine(l1, 1.0, 0.0)?, l1.shape().clone()))
}

/// The custom op behind `conv2d`: forward copies its first argument (`pass_through`), backward
/// routes g to x and w.
struct Conv2dBackward {
    padding: usize,
}

impl CustomOp3 for Conv2dBackward {
    fn name(&self) -> &'static str {
        "conv2d-stride1"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        pass_through(s1, l1)
    }
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        pass_through(s1, l1)
    }
    fn metal_fwd(
        &self,
        s1: &MetalStorage,
        l1: &Layout,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> candle_core::Result<(MetalStorage, Shape)> {
        pass_through(s1, l1)
    }
    fn bwd(
        &self,
        _value: &Tensor,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let p = self.padding;
        let (_, _, k, _) = w.dims4()?;
        let dx = if x.track_op() {
            // dL/dx[b, c, y, z] = Σ_{o,i,j} g[b, o, y + p − i, z + p − j] · w[o, c, i, j]
            //                   = (g ⊛ w')[b, c, y, z],  w'[c, o, i, j] = w[o, c, k−1−i, k−1−j],
            // a stride-1 convolution with padding k − 1 − p (which gives back H and W).
            let rev = Tensor::from_vec((0..k as u32).rev().collect::<Vec<_>>(), k, w.device())?;
            let flipped =
                w.detach().index_select(&rev, 2)?.index_select(&rev, 3)?.transpose(0, 1)?;
            Some(g.conv2d(&flipped.contiguous()?, k - 1 - p, 1, 1, 1)?)
        } else {
            None
        };
        let dw = if w.track_op() {
            // dL/dw[o, c, i, j] = Σ_{b,h,w} g[b, o, h, w] · x_pad[b, c, h + i, w + j]: a
            // convolution over the batch axis (the formula of candle's own conv2d backward).
            let gw = x
                .detach()
                .transpose(0, 1)?
                .conv2d(&g.transpose(0, 1)?, p, 1, 1, 1)?
                .transpose(0, 1)?;
            let (_, _, gh, gwid) = gw.dims4()?;
            Some(if gh != k || gwid != k { gw.narrow(2, 0, k)?.narrow(3, 0, k)? } else { gw })
        } else {
            None
        };
        Ok((None, dx, dw))
    }
}

/// `value` in the forward pass; in the backward pass the incoming gradient g goes to `param` as
/// `vjp(g)` and nowhere else. Without a tracked `param` (evaluation) this is just `value`.
fn with_param_grad<F>(value: Tensor, param: &Tensor, vjp: F) -> Result<Tensor>
where
    F: Fn(&Tensor) -> candle_core::Result<Tensor> + Send + Sync + 'static,
{
    if !param.track_op() {
        return Ok(value);
    }
    Ok(value.apply_op2(param, ParamOnlyGrad { vjp })?)
}

/// The custom op behind `with_param_grad`: forward copies its first argument (`pass_through`),
/// backward returns (nothing, vjp(g)).
struct ParamOnlyGrad<F> {
    vjp: F,
}

impl<F> CustomOp2 for ParamOnlyGrad<F>
where
    F: Fn(&Tensor) -> candle_core::Result<Tensor> + Send + Sync,
{
    fn name(&self) -> &'static str {
        "param-only-grad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        pass_through(s1, l1)
    }
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        pass_through(s1, l1)
    }
    fn metal_fwd(
        &self,
        s1: &MetalStorage,
        l1: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> candle_core::Result<(MetalStorage, Shape)> {
        pass_through(s1, l1)
    }
    fn bwd(
        &self,
        _value: &Tensor,
        _param: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((None, Some((self.vjp)(grad)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn tmpdir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    #[test]
    fn build_default_models() {
        let mlp = build("mlp", &mlp::DEFAULT_HIDDEN, [1, 28, 28], 10).unwrap();
        assert_eq!(mlp.layout().len(), 898_510);
        assert_eq!(mlp.describe(), "mlp 784-500-500-500-10 (ReLU), 898510 params");
        let cnn = build("cnn", &cnn::DEFAULT_FILTERS, [1, 28, 28], 10).unwrap();
        assert_eq!(cnn.layout().len(), 20 * 9 + 20 + 10 * 20 * 9 + 10 + 10 * 7840 + 10);
    }

    #[test]
    fn build_rejects_nonsense() {
        match build("resnet", &[], [1, 28, 28], 10) {
            Err(Error::Config { key, msg }) => {
                assert_eq!(key, "model.kind");
                assert!(msg.contains("resnet"), "{msg}");
            }
            other => panic!("expected a config error, got {:?}", other.map(|m| m.describe())),
        }
        for hidden in [&[20usize, 10, 5][..], &[20], &[]] {
            match build("cnn", hidden, [1, 28, 28], 10) {
                Err(Error::Config { key, .. }) => assert_eq!(key, "model.hidden"),
                other => panic!("expected a config error, got {:?}", other.map(|m| m.describe())),
            }
        }
        assert!(matches!(build("mlp", &[500, 0], [1, 28, 28], 10), Err(Error::Config { .. })));
        assert!(build("mlp", &[5], [1, 28, 28], 0).is_err());
        // No hidden layer is a valid MLP: multinomial logistic regression.
        assert_eq!(build("mlp", &[], [1, 2, 2], 3).unwrap().layout().len(), 4 * 3 + 3);
    }

    #[test]
    fn init_is_deterministic_and_lecun_scaled() {
        let model = mlp::Mlp::new(784, &mlp::DEFAULT_HIDDEN, 10);
        let a = init_params(&model, 7);
        assert_eq!(a, init_params(&model, 7));
        let b = init_params(&model, 8);
        assert_eq!(a.len(), b.len());
        assert!(a.iter().zip(&b).filter(|(x, y)| x != y).count() > a.len() / 2);
        for spec in &model.layout().params {
            let w = &a[spec.range()];
            if spec.shape.len() == 1 {
                assert!(w.iter().all(|&v| v == 0.0), "{} should be zero", spec.name);
                continue;
            }
            let fan_in = spec.shape[1] as f64;
            let n = w.len() as f64;
            let mean = w.iter().map(|&v| v as f64).sum::<f64>() / n;
            let var = w.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
            assert!(mean.abs() < 4.0 * (1.0 / fan_in / n).sqrt(), "{}: mean {mean}", spec.name);
            assert!(
                (var * fan_in - 1.0).abs() < 0.05,
                "{}: var·fan_in = {}",
                spec.name,
                var * fan_in
            );
            let bound = 2.0 / TRUNCATED_NORMAL_STD / fan_in.sqrt();
            assert!(w.iter().all(|&v| (v as f64).abs() <= bound * (1.0 + 1e-6)), "{}", spec.name);
        }
        // Conv fan_in is in_ch·kh·kw.
        let cnn = cnn::Cnn::new([3, 8, 8], [16, 4], 10);
        let theta = init_params(&cnn, 1);
        let w = &theta[cnn.layout().get("conv.1.weight").unwrap().range()];
        let var = w.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / w.len() as f64;
        assert!((var * (16.0 * 9.0) - 1.0).abs() < 0.15, "var·fan_in = {}", var * 144.0);
    }

    #[test]
    fn safetensors_round_trip_is_bit_identical() {
        let dir = tmpdir();
        let path = dir.path().join("w.safetensors");
        let model = cnn::Cnn::new([1, 5, 5], [2, 3], 4);
        let mut theta = init_params(&model, 3);
        theta[0] = -0.0;
        theta[1] = f32::MIN_POSITIVE / 8.0; // subnormal
        theta[2] = f32::MAX;
        save_safetensors(model.layout(), &theta, &path).unwrap();
        assert!(!path.with_extension("safetensors.tmp").exists());
        let back = load_safetensors(&model, &path).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&theta), bits(&back));
        // Overwriting an existing file works too.
        save_safetensors(model.layout(), &back, &path).unwrap();
        assert_eq!(bits(&theta), bits(&load_safetensors(&model, &path).unwrap()));
    }

    /// Write a safetensors file with the given (name, dtype, shape, bytes).
    fn write_raw(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
        let views: Vec<_> = tensors
            .iter()
            .map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn checkpoint_msg(r: Result<Vec<f32>>) -> String {
        match r {
            Err(Error::Checkpoint { msg, .. }) => msg,
            other => panic!("expected a checkpoint error, got {other:?}"),
        }
    }

    #[test]
    fn load_errors_name_the_tensor() {
        let dir = tmpdir();
        let path = dir.path().join("w.safetensors");
        // layers.0.weight [2, 3], layers.0.bias [2], layers.1.weight [2, 2], layers.1.bias [2]
        let model = mlp::Mlp::new(3, &[2], 2);
        let good = vec![
            ("layers.0.weight", Dtype::F32, vec![2, 3], f32_bytes(&[1.0; 6])),
            ("layers.0.bias", Dtype::F32, vec![2], f32_bytes(&[2.0; 2])),
            ("layers.1.weight", Dtype::F32, vec![2, 2], f32_bytes(&[3.0; 4])),
            ("layers.1.bias", Dtype::F32, vec![2], f32_bytes(&[4.0; 2])),
        ];
        write_raw(&path, &good);
        assert_eq!(
            load_safetensors(&model, &path).unwrap(),
            [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 3.0, 3.0, 4.0, 4.0]
        );

        write_raw(&path, &good[..3]);
        let msg = checkpoint_msg(load_safetensors(&model, &path));
        assert!(msg.contains("missing") && msg.contains("`layers.1.bias`"), "{msg}");

        let mut bad = good.clone();
        bad[2] = ("layers.1.weight", Dtype::F32, vec![4, 1], f32_bytes(&[3.0; 4]));
        write_raw(&path, &bad);
        let msg = checkpoint_msg(load_safetensors(&model, &path));
        assert!(msg.contains("`layers.1.weight`") && msg.contains("[4, 1]"), "{msg}");

        let mut bad = good.clone();
        bad.push(("layers.2.weight", Dtype::F32, vec![1], f32_bytes(&[0.0])));
        bad.push(("extra", Dtype::F32, vec![1], f32_bytes(&[0.0])));
        write_raw(&path, &bad);
        let msg = checkpoint_msg(load_safetensors(&model, &path));
        assert!(msg.contains("unexpected") && msg.contains("`extra`, `layers.2.weight`"), "{msg}");

        let mut bad = good.clone();
        bad[1] = ("layers.0.bias", Dtype::I32, vec![2], vec![0; 8]);
        write_raw(&path, &bad);
        let msg = checkpoint_msg(load_safetensors(&model, &path));
        assert!(msg.contains("`layers.0.bias`") && msg.contains("I32"), "{msg}");

        let mut bad = good.clone();
        bad[1] = ("layers.0.bias", Dtype::F32, vec![2], f32_bytes(&[f32::NAN, 0.0]));
        write_raw(&path, &bad);
        let msg = checkpoint_msg(load_safetensors(&model, &path));
        assert!(msg.contains("`layers.0.bias`") && msg.contains("non-finite"), "{msg}");

        std::fs::write(&path, b"not a safetensors file").unwrap();
        checkpoint_msg(load_safetensors(&model, &path));

        let msg = checkpoint_msg(load_safetensors(&model, &dir.path().join("absent.safetensors")));
        assert!(msg.contains("cannot read"), "{msg}");
    }

    #[test]
    fn load_converts_f64_f16_bf16() {
        let dir = tmpdir();
        let path = dir.path().join("w.safetensors");
        let model = mlp::Mlp::new(2, &[], 2); // layers.0.weight [2,2], layers.0.bias [2]
        let w64: Vec<u8> =
            [0.5f64, -1.25, 3.0, 1e-3].iter().flat_map(|x| x.to_le_bytes()).collect();
        // f16: 1.0 = 0x3c00, -2.0 = 0xc000; bf16: 1.5 = 0x3fc0.
        let b16: Vec<u8> = [0x3c00u16, 0xc000].iter().flat_map(|x| x.to_le_bytes()).collect();
        write_raw(
            &path,
            &[
                ("layers.0.weight", Dtype::F64, vec![2, 2], w64),
                ("layers.0.bias", Dtype::F16, vec![2], b16),
            ],
        );
        assert_eq!(load_safetensors(&model, &path).unwrap(), [0.5, -1.25, 3.0, 1e-3, 1.0, -2.0]);
        let bf: Vec<u8> = [0x3fc0u16, 0x8000].iter().flat_map(|x| x.to_le_bytes()).collect();
        write_raw(
            &path,
            &[
                ("layers.0.weight", Dtype::F32, vec![2, 2], f32_bytes(&[0.0; 4])),
                ("layers.0.bias", Dtype::BF16, vec![2], bf),
            ],
        );
        let theta = load_safetensors(&model, &path).unwrap();
        assert_eq!(theta[4], 1.5);
        assert!(theta[5] == 0.0 && theta[5].is_sign_negative());
    }

    #[test]
    fn save_rejects_wrong_length() {
        let dir = tmpdir();
        let model = mlp::Mlp::new(2, &[], 2);
        let err = save_safetensors(model.layout(), &[0.0; 5], &dir.path().join("w.safetensors"));
        assert!(matches!(err, Err(Error::Checkpoint { .. })));
    }

    /// `input_linear` and `conv2d` give the same values and gradients as candle's own ops, and no
    /// gradient for an input that does not track one.
    #[test]
    fn layer_ops_match_candle() {
        let dev = Device::Cpu;
        let loss = |t: &Tensor| t.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        for (k, padding) in [(3, 1), (3, 0), (3, 2), (5, 2), (1, 0)] {
            let x = Var::randn(0f32, 1.0, (3, 2, 6, 5), &dev).unwrap();
            let w = Var::randn(0f32, 1.0, (4, 2, k, k), &dev).unwrap();
            let ours = conv2d(&x, &w, padding).unwrap();
            let reference = x.conv2d(&w, padding, 1, 1, 1).unwrap();
            assert_close(&ours, &reference, 1e-6);
            let (g_ours, g_ref) = (loss(&ours), loss(&reference));
            assert_close(g_ours.get(&x).unwrap(), g_ref.get(&x).unwrap(), 1e-5);
            assert_close(g_ours.get(&w).unwrap(), g_ref.get(&w).unwrap(), 1e-5);
            // Data input: no input gradient.
            let data = x.as_detached_tensor();
            let g = loss(&conv2d(&data, &w, padding).unwrap());
            assert!(g.get(&data).is_none());
            assert_close(g.get(&w).unwrap(), g_ref.get(&w).unwrap(), 1e-5);
            // Fixed weights: input gradient only.
            let fixed = w.as_detached_tensor();
            let g = loss(&conv2d(&x, &fixed, padding).unwrap());
            assert!(g.get(&fixed).is_none());
            assert_close(g.get(&x).unwrap(), g_ref.get(&x).unwrap(), 1e-5);
        }
        assert!(conv2d(
            &Tensor::zeros((1, 1, 4, 4), candle_core::DType::F32, &dev).unwrap(),
            &Tensor::zeros((1, 1, 3, 3), candle_core::DType::F32, &dev).unwrap(),
            3
        )
        .is_err());

        let x = Var::randn(0f32, 1.0, (4, 6), &dev).unwrap();
        let w = Var::randn(0f32, 1.0, (3, 6), &dev).unwrap();
        let ours = input_linear(&x, &w).unwrap();
        let reference = x.matmul(&w.t().unwrap()).unwrap();
        assert_close(&ours, &reference, 1e-6);
        let (g_ours, g_ref) = (loss(&ours), loss(&reference));
        assert!(g_ours.get(&x).is_none());
        assert!(g_ref.get(&x).is_some());
        assert_close(g_ours.get(&w).unwrap(), g_ref.get(&w).unwrap(), 1e-5);
    }

    fn assert_close(a: &Tensor, b: &Tensor, tol: f32) {
        assert_eq!(a.dims(), b.dims());
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let scale = b.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= tol * scale, "{x} vs {y}");
        }
    }

    #[test]
    fn tensor_into_slice_copies_and_accumulates() {
        let t =
            Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], (2, 3), &Device::Cpu).unwrap();
        let mut out = [0.0f32; 6];
        tensor_into_slice(&t, &mut out, false).unwrap();
        assert_eq!(out, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        // A non-contiguous view goes through the fallback path.
        tensor_into_slice(&t.t().unwrap(), &mut out, true).unwrap();
        assert_eq!(out, [2.0, 6.0, 5.0, 9.0, 8.0, 12.0]);
        assert!(tensor_into_slice(&t, &mut [0.0; 5], false).is_err());
    }
}
