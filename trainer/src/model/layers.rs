//! Layers with their own backward passes, and the layers the vision models share.
//!
//! - `input_linear` never computes a gradient with respect to the input images (candle's matmul
//!   backward always does; for the default MLP that is the 784×500 product, a fifth of the
//!   backward flops, thrown away);
//! - `conv2d` (any stride and padding) skips it too; on the CPU (f32, f64) it runs
//!   `cpu_layers`' im2col + GEMM kernels forward and backward (`ConvOp`), elsewhere candle's conv
//!   forward and, backward, the input gradient as a convolution rather than with candle's slow
//!   `conv_transpose2d` (`conv2d_backward`);
//! - `batch_norm` over ghost batches (training; on the CPU one fused op with its own backward,
//!   optionally with the ReLU that follows fused in) or with running statistics (evaluation);
//! - `add_relu` (the residual join), `global_avg_pool`, `avg_pool2d`, `linear`.
//!
//! Every layer's gradient is tested against finite differences or candle's own autograd, and each
//! CPU kernel against the candle-op composition it replaces.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, MetalStorage, Shape, Tensor, WithDType,
};

use super::cpu_layers::{self, BnGeom, ConvGeom, Elem};
use crate::error::{Error, Result};

/// a · b (candle's `matmul`: batched over leading dims). Half precision on the CPU, where candle
/// has no bf16/f16 matmul, is emulated: the operands widened to f32 (exactly), the product in
/// f32, rounded to the half type — what a GPU's bf16 GEMM computes (half inputs, f32
/// accumulation, half output) up to the order of the sums. The casts are graph ops, so the
/// gradient is that of the emulated product.
pub(crate) fn matmul(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if half_on_cpu(a) {
        return a.to_dtype(DType::F32)?.matmul(&b.to_dtype(DType::F32)?)?.to_dtype(a.dtype());
    }
    a.matmul(b)
}

/// A bf16 or f16 tensor in host memory (what candle's CPU matmul and conv do not take).
fn half_on_cpu(t: &Tensor) -> bool {
    matches!(t.dtype(), DType::BF16 | DType::F16) && t.device().is_cpu()
}

/// y = x·wᵀ for the first layer: x [batch, in] (the input), w [out, in]. In the backward pass
/// only w gets a gradient (gᵀ·x); candle's matmul backward would also form g·w for x.
pub(crate) fn input_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let x = x.detach();
    let value = matmul(&x, &w.detach().t()?)?;
    with_param_grad(value, w, move |g| matmul(&g.t()?, &x))
}

/// 2-D convolution x [batch, C, H, W] ⊛ w [out, C, k, k], stride `stride`, dilation 1, zero
/// padding `padding` < k on every side (so "same" at stride 1 is padding (k − 1)/2), no bias,
/// with its own backward pass:
/// - the input gradient is a stride-1 convolution of g — dilated by inserting stride − 1 zeros
///   between its entries and padded by k − 1 − padding (plus the rows and columns the forward
///   pass's floor division dropped) — with the spatially flipped, channel-transposed kernel: the
///   transposed convolution, written as a convolution. candle's conv backward uses its CPU
///   `conv_transpose2d` instead, which is ~15× slower than the forward conv at the CNN's sizes
///   (650 ms against 45 ms for 64×20×28×28 → 10 channels), so it dominated the CNN's whole
///   gradient evaluation;
/// - the input gradient is skipped when x does not track gradients (the input images), and the
///   weight gradient when w does not.
pub(crate) fn conv2d(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    if half_on_cpu(x) {
        // As `matmul`: the convolution in f32, rounded to the half type.
        let f32 = DType::F32;
        return Ok(conv2d(&x.to_dtype(f32)?, &w.to_dtype(f32)?, padding, stride)?.to_dtype(x.dtype())?);
    }
    let (_, _, kh, kw) = w.dims4()?;
    if kh != kw || padding >= kh || stride == 0 {
        return Err(Error::model(format!(
            "conv2d needs a square kernel, padding < kernel size and stride ≥ 1, \
             got {kh}×{kw} with padding {padding}, stride {stride}"
        )));
    }
    if cpu_native(&[x, w]) {
        let (x, w) = (x.contiguous()?, w.contiguous()?);
        let op = ConvOp { padding, stride };
        return Ok(if x.track_op() || w.track_op() { x.apply_op2(&w, op)? } else { x.apply_op2_no_bwd(&w, &op)? });
    }
    let value = x.detach().conv2d(&w.detach(), padding, stride, 1, 1)?;
    if !x.track_op() && !w.track_op() {
        return Ok(value);
    }
    with_grads(&value, x, w, "conv2d", move |x, w, g| conv2d_backward(padding, stride, x, w, g))
}

/// Whether `cpu_layers`' kernels take these tensors: all on the CPU, all f32 or all f64.
pub(crate) fn cpu_native(ts: &[&Tensor]) -> bool {
    let dtype = ts[0].dtype();
    matches!(dtype, DType::F32 | DType::F64) && ts.iter().all(|t| t.device().is_cpu() && t.dtype() == dtype)
}

/// A contiguous CPU tensor's elements as a slice of T (an error for other layouts and types).
pub(crate) fn slice<'a, T: Elem>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [T]> {
    let (start, end) =
        l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("cpu_layers: a non-contiguous operand".into()))?;
    Ok(&T::cpu_storage_as_slice(s)?[start..end])
}

/// Runs `$body` with `$t` the element type of the storage `$s` (f32 or f64).
macro_rules! for_dtype {
    ($s:expr, $t:ident => $body:expr) => {
        match $s {
            CpuStorage::F32(_) => {
                type $t = f32;
                $body
            }
            CpuStorage::F64(_) => {
                type $t = f64;
                $body
            }
            other => Err(candle_core::Error::Msg(format!("no CPU kernel for {:?}", other.dtype()))),
        }
    };
}
pub(crate) use for_dtype;

fn dims4(l: &Layout) -> candle_core::Result<(usize, usize, usize, usize)> {
    l.shape().dims4()
}

fn conv_geom(x: &Layout, w: &Layout, padding: usize, stride: usize) -> candle_core::Result<ConvGeom> {
    ConvGeom::new(dims4(x)?, dims4(w)?, padding, stride).ok_or_else(|| {
        candle_core::Error::Msg(format!("conv2d: {:?} ⊛ {:?} padding {padding} stride {stride}", x.dims(), w.dims()))
    })
}

/// The CPU convolution x ⊛ w (`cpu_layers::conv_forward`); backward: the input gradient (when x
/// tracks one) with `ConvInputGrad`, the weight gradient (when w does) with `ConvWeightGrad`.
struct ConvOp {
    padding: usize,
    stride: usize,
}

impl CustomOp2 for ConvOp {
    fn name(&self) -> &'static str {
        "conv2d-cpu"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = conv_geom(l1, l2, self.padding, self.stride)?;
        for_dtype!(s1, T => {
            let y = cpu_layers::conv_forward::<T>(slice(s1, l1)?, slice(s2, l2)?, &g).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            Ok((T::to_cpu_storage_owned(y), Shape::from((g.b, g.o, g.oh, g.ow))))
        })
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let (_, _, h, wd) = x.dims4()?;
        let (p, s) = (self.padding, self.stride);
        let dx = if x.track_op() {
            Some(g.apply_op2_no_bwd(w, &ConvInputGrad { padding: p, stride: s, h, w: wd })?)
        } else {
            None
        };
        let dw = if w.track_op() {
            Some(x.apply_op2_no_bwd(&g, &ConvWeightGrad { padding: p, stride: s, k: w.dim(2)? })?)
        } else {
            None
        };
        Ok((dx, dw))
    }
}

/// (gy, w) → dL/dx of `ConvOp` for an input of h × w pixels.
struct ConvInputGrad {
    padding: usize,
    stride: usize,
    h: usize,
    w: usize,
}

impl CustomOp2 for ConvInputGrad {
    fn name(&self) -> &'static str {
        "conv2d-cpu-input-grad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, _, gh, gw) = dims4(l1)?;
        let (_, c, _, _) = dims4(l2)?;
        let g = ConvGeom::new((b, c, self.h, self.w), dims4(l2)?, self.padding, self.stride)
            .filter(|g| (g.oh, g.ow) == (gh, gw))
            .ok_or_else(|| candle_core::Error::Msg("conv2d backward: gradient of the wrong shape".into()))?;
        for_dtype!(s1, T => {
            let dx = cpu_layers::conv_input_grad::<T>(slice(s1, l1)?, slice(s2, l2)?, &g).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            Ok((T::to_cpu_storage_owned(dx), Shape::from((b, c, self.h, self.w))))
        })
    }
}

/// (x, gy) → dL/dw [O, C, k, k] of `ConvOp`.
struct ConvWeightGrad {
    padding: usize,
    stride: usize,
    k: usize,
}

impl CustomOp2 for ConvWeightGrad {
    fn name(&self) -> &'static str {
        "conv2d-cpu-weight-grad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = dims4(l1)?;
        let (_, o, gh, gw) = dims4(l2)?;
        let g = ConvGeom::new((b, c, h, w), (o, c, self.k, self.k), self.padding, self.stride)
            .filter(|g| (g.oh, g.ow) == (gh, gw))
            .ok_or_else(|| candle_core::Error::Msg("conv2d backward: gradient of the wrong shape".into()))?;
        for_dtype!(s1, T => {
            let dw = cpu_layers::conv_weight_grad::<T>(slice(s1, l1)?, slice(s2, l2)?, &g).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            Ok((T::to_cpu_storage_owned(dw), Shape::from((o, c, self.k, self.k))))
        })
    }
}

/// The forward pass of the custom ops below, on every backend: a copy of the first argument (the
/// value, computed beforehand from detached tensors). The copy is one activation-sized pass,
/// small next to the matmul or conv that produced the value. The ops differ only in `bwd`; the
/// rest of their impls is what `CustomOp2`/`CustomOp3` require: one method per backend and arity,
/// each with its own storage type (the defaults of `cuda_fwd` and `metal_fwd` are errors).
fn pass_through<S: BackendStorage>(s1: &S, l1: &Layout) -> candle_core::Result<(S, Shape)> {
    Ok((s1.affine(l1, 1.0, 0.0)?, l1.shape().clone()))
}

/// `value` in the forward pass (computed beforehand from detached tensors); in the backward pass
/// the incoming gradient g goes to `a` and `b` as `bwd(a, b, g)` says. The custom op behind
/// `conv2d` off the CPU and the ODE block's adjoint methods (`model::ode`).
pub(crate) fn with_grads<F>(value: &Tensor, a: &Tensor, b: &Tensor, name: &'static str, bwd: F) -> Result<Tensor>
where
    F: Fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> + Send + Sync + 'static,
{
    Ok(value.apply_op3(a, b, PassThroughGrads { name, bwd })?)
}

/// The custom op behind `with_grads`: forward copies its first argument (`pass_through`),
/// backward returns (nothing, bwd(a, b, g)).
struct PassThroughGrads<F> {
    name: &'static str,
    bwd: F,
}

impl<F> CustomOp3 for PassThroughGrads<F>
where
    F: Fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> + Send + Sync,
{
    fn name(&self) -> &'static str {
        self.name
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
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (da, db) = (self.bwd)(a, b, g)?;
        Ok((None, da, db))
    }
}

/// The backward pass of `conv2d` off the CPU: the gradients of x and w (each when it tracks)
/// from g, the gradient at the output.
fn conv2d_backward(
    p: usize,
    s: usize,
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
    let (_, _, k, _) = w.dims4()?;
    let (_, _, h, wid) = x.dims4()?;
    let (_, _, gh, gw) = g.dims4()?;
    let dx = if x.track_op() {
        // dL/dx[b, c, y, z] = Σ_{o,i,j} g[b, o, (y + p − i)/s, (z + p − j)/s] · w[o, c, i, j]
        // over the (i, j) where the division is exact. With g dilated (g_s[b, o, s·u, s·v] =
        // g[b, o, u, v], zero elsewhere) that is (g_s ⊛ w')[b, c, y, z] with
        // w'[c, o, i, j] = w[o, c, k−1−i, k−1−j] and padding k − 1 − p: a stride-1
        // convolution. The dilated g covers (gh − 1)·s + 1 rows; the forward pass dropped the
        // last (h + 2p − k) mod s input rows, whose gradient is what the extra bottom
        // padding gives (and likewise for columns).
        let rev = Tensor::from_vec((0..k as u32).rev().collect::<Vec<_>>(), k, w.device())?;
        let flipped = w.detach().index_select(&rev, 2)?.index_select(&rev, 3)?.transpose(0, 1)?.contiguous()?;
        let q = k - 1 - p;
        let g = g.contiguous()?;
        if s == 1 {
            Some(g.conv2d(&flipped, q, 1, 1, 1)?)
        } else {
            let (b, o) = (g.dim(0)?, g.dim(1)?);
            // Dilate: (B, O, gh, 1, gw, 1) padded to (B, O, gh, s, gw, s), flattened, cut.
            let dilated = g
                .reshape((b, o, gh, 1, gw, 1))?
                .pad_with_zeros(3, 0, s - 1)?
                .pad_with_zeros(5, 0, s - 1)?
                .reshape((b, o, gh * s, gw * s))?
                .narrow(2, 0, (gh - 1) * s + 1)?
                .narrow(3, 0, (gw - 1) * s + 1)?;
            let extra_h = h + 2 * p - k - (gh - 1) * s;
            let extra_w = wid + 2 * p - k - (gw - 1) * s;
            let padded = dilated.pad_with_zeros(2, q, q + extra_h)?.pad_with_zeros(3, q, q + extra_w)?;
            Some(padded.conv2d(&flipped, 0, 1, 1, 1)?)
        }
    } else {
        None
    };
    let dw = if w.track_op() {
        // dL/dw[o, c, i, j] = Σ_{b,y,z} g[b, o, y, z] · x_pad[b, c, s·y + i, s·z + j]: a
        // convolution over the batch axis with g as the kernel, dilated by the stride (the
        // formula of candle's own conv2d backward).
        let gw = x.detach().transpose(0, 1)?.conv2d(&g.transpose(0, 1)?, p, 1, s, 1)?.transpose(0, 1)?;
        let (_, _, rh, rw) = gw.dims4()?;
        Some(if rh != k || rw != k { gw.narrow(2, 0, k)?.narrow(3, 0, k)? } else { gw })
    } else {
        None
    };
    Ok((dx, dw))
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

/// ε of batch norm: PyTorch's default (`torch.nn.BatchNorm2d(eps=1e-5)`).
pub(crate) const BN_EPS: f64 = 1e-5;

/// Training-mode batch norm over ghost batches: x [B, C, H, W] is cut into B / `group`
/// consecutive groups of `group` samples, and each group is normalised with its own mean and
/// (biased) variance over (samples, H, W) per channel, then scaled by γ and shifted by β [C];
/// with `relu`, the ReLU that follows is applied too. The gradient flows through the statistics
/// as in PyTorch's training-mode `BatchNorm2d` (one group = the whole batch is exactly PyTorch's).
/// Returns y and the groups' means and biased variances, each [B / group, C] (no gradient).
///
/// On the CPU (f32, f64) this is one op (`BnTrainOp`) over `cpu_layers`' kernels, with its own
/// backward pass; elsewhere the composition of candle ops in `batch_norm_train_ops`.
pub(crate) fn batch_norm_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    group: usize,
    relu: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, c, h, w) = x.dims4()?;
    if group == 0 || b % group != 0 {
        return Err(Error::model(format!(
            "batch norm over groups of {group} samples got a batch of {b}, not a multiple"
        )));
    }
    if !cpu_native(&[x, gamma, beta]) {
        let (y, mean, var) = batch_norm_train_ops(x, gamma, beta, group)?;
        return Ok((if relu { y.relu()? } else { y }, mean, var));
    }
    let geom = BnGeom { b, c, hw: h * w, group };
    let x = x.contiguous()?;
    let stats = x.apply_op1_no_bwd(&BnStatsOp { geom })?; // (2, groups, C), f64
    let values = stats.flatten_all()?.to_vec1::<f64>()?;
    let (mean, var) = values.split_at(values.len() / 2);
    let inv_std = var.iter().map(|v| 1.0 / (v + BN_EPS).sqrt()).collect();
    let op = BnTrainOp { geom, relu, mean: Arc::new(mean.to_vec()), inv_std: Arc::new(inv_std) };
    let (gamma, beta) = (gamma.contiguous()?, beta.contiguous()?);
    let y = if x.track_op() || gamma.track_op() || beta.track_op() {
        x.apply_op3(&gamma, &beta, op)?
    } else {
        x.apply_op3_no_bwd(&gamma, &beta, &op)?
    };
    let stat = |i: usize| stats.get(i)?.to_dtype(x.dtype());
    Ok((y, stat(0)?, stat(1)?))
}

/// `batch_norm_train` (without the ReLU) from candle ops that all have a backward pass: the
/// path for CUDA tensors, and the reference the CPU op is tested against.
fn batch_norm_train_ops(x: &Tensor, gamma: &Tensor, beta: &Tensor, group: usize) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, c, h, w) = x.dims4()?;
    let groups = b / group;
    let xr = x.reshape((groups, group, c, h * w))?;
    let mean = xr.mean_keepdim(3)?.mean_keepdim(1)?; // (groups, 1, C, 1)
    let centred = xr.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(3)?.mean_keepdim(1)?; // biased, (groups, 1, C, 1)
    let inv_std = (var.affine(1.0, BN_EPS)?).sqrt()?.recip()?;
    let y = centred
        .broadcast_mul(&inv_std)?
        .broadcast_mul(&gamma.reshape((1, 1, c, 1))?)?
        .broadcast_add(&beta.reshape((1, 1, c, 1))?)?
        .reshape((b, c, h, w))?;
    Ok((y, mean.reshape((groups, c))?, var.reshape((groups, c))?))
}

/// x → its ghost batches' means and biased variances, (2, groups, C) in f64.
struct BnStatsOp {
    geom: BnGeom,
}

impl CustomOp1 for BnStatsOp {
    fn name(&self) -> &'static str {
        "batch-norm-stats-cpu"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (mut mean, var) = for_dtype!(s, T => Ok(cpu_layers::bn_stats::<T>(slice(s, l)?, &self.geom)))?;
        mean.extend(var);
        Ok((CpuStorage::F64(mean), Shape::from((2, self.geom.b / self.geom.group, self.geom.c))))
    }
}

/// (x, γ, β) → y of training-mode batch norm (+ ReLU) with the statistics computed beforehand
/// (`BnStatsOp`); backward: `BnBackwardOp`.
struct BnTrainOp {
    geom: BnGeom,
    relu: bool,
    mean: Arc<Vec<f64>>,    // [groups·C]
    inv_std: Arc<Vec<f64>>, // [groups·C]: 1/√(var + ε)
}

impl CustomOp3 for BnTrainOp {
    fn name(&self) -> &'static str {
        "batch-norm-train-cpu"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        for_dtype!(s1, T => {
            let y = cpu_layers::bn_forward::<T>(
                slice(s1, l1)?,
                slice(s2, l2)?,
                slice(s3, l3)?,
                &self.mean,
                &self.inv_std,
                self.relu,
                &self.geom,
            );
            Ok((T::to_cpu_storage_owned(y), l1.shape().clone()))
        })
    }
    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op =
            BnBackwardOp { geom: self.geom, relu: self.relu, mean: self.mean.clone(), inv_std: self.inv_std.clone() };
        // One flat result: dx, then dγ, then dβ.
        let packed =
            x.apply_op3_no_bwd(&g.contiguous()?, &res.contiguous()?, &WithGamma { op, gamma: gamma.clone() })?;
        let (n, c) = (x.elem_count(), self.geom.c);
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        Ok((Some(dx), Some(packed.narrow(0, n, c)?), Some(packed.narrow(0, n + c, c)?)))
    }
}

/// The backward pass of `BnTrainOp`: (x, gy, y) → [dx (flat), dγ, dβ] with γ from `WithGamma`.
struct BnBackwardOp {
    geom: BnGeom,
    relu: bool,
    mean: Arc<Vec<f64>>,
    inv_std: Arc<Vec<f64>>,
}

/// `BnBackwardOp` with γ (a fourth operand, which a `CustomOp3` has no room for: read from its
/// CPU storage directly).
struct WithGamma {
    op: BnBackwardOp,
    gamma: Tensor,
}

impl CustomOp3 for WithGamma {
    fn name(&self) -> &'static str {
        "batch-norm-backward-cpu"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let gamma = self.gamma.contiguous()?;
        let (guard, gl) = gamma.storage_and_layout();
        let candle_core::Storage::Cpu(gs) = &*guard else {
            return Err(candle_core::Error::Msg("batch norm backward: γ is not on the CPU".into()));
        };
        let op = &self.op;
        for_dtype!(s1, T => {
            let (dx, dgamma, dbeta) = cpu_layers::bn_backward::<T>(
                slice(s1, l1)?,
                slice(s3, l3)?,
                slice(s2, l2)?,
                slice(gs, gl)?,
                &op.mean,
                &op.inv_std,
                op.relu,
                &op.geom,
            );
            let mut out = dx;
            out.extend(dgamma.iter().chain(&dbeta).map(|&v| T::from_f64(v)));
            let len = out.len();
            Ok((T::to_cpu_storage_owned(out), Shape::from(len)))
        })
    }
}

/// max(a + b, 0), the residual join of a ResNet block: on the CPU one pass forward and one
/// backward (`AddReluOp`), elsewhere candle's add and ReLU.
pub(crate) fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !cpu_native(&[a, b]) || a.dims() != b.dims() {
        return Ok((a + b)?.relu()?);
    }
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    Ok(if a.track_op() || b.track_op() { a.apply_op2(&b, AddReluOp)? } else { a.apply_op2_no_bwd(&b, &AddReluOp)? })
}

struct AddReluOp;

impl CustomOp2 for AddReluOp {
    fn name(&self) -> &'static str {
        "add-relu-cpu"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        for_dtype!(s1, T => {
            let y = cpu_layers::add_relu::<T>(slice(s1, l1)?, slice(s2, l2)?);
            Ok((T::to_cpu_storage_owned(y), l1.shape().clone()))
        })
    }
    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let masked = g.contiguous()?.apply_op2_no_bwd(&res.contiguous()?, &ReluMaskOp)?;
        Ok((Some(masked.clone()), Some(masked)))
    }
}

/// (g, y) → g where y > 0, else 0.
struct ReluMaskOp;

impl CustomOp2 for ReluMaskOp {
    fn name(&self) -> &'static str {
        "relu-mask-cpu"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        for_dtype!(s1, T => {
            let m = cpu_layers::relu_mask::<T>(slice(s1, l1)?, slice(s2, l2)?);
            Ok((T::to_cpu_storage_owned(m), l1.shape().clone()))
        })
    }
}

/// Evaluation-mode batch norm with the running statistics, computed as PyTorch's CPU kernel
/// does (`batch_norm_cpu_transform_input`): α = γ / √(var + ε), β' = β − mean·α, y = x·α + β'.
pub(crate) fn batch_norm_eval(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
) -> Result<Tensor> {
    let c = x.dim(1)?;
    let alpha = (gamma / running_var.affine(1.0, BN_EPS)?.sqrt()?)?;
    let shift = (beta - (running_mean * &alpha)?)?;
    Ok(x.broadcast_mul(&alpha.reshape((1, c, 1, 1))?)?.broadcast_add(&shift.reshape((1, c, 1, 1))?)?)
}

/// Mean over the spatial dims: [B, C, H, W] → [B, C] (PyTorch's `AdaptiveAvgPool2d(1)` + flatten).
pub(crate) fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    Ok(x.reshape((b, c, h * w))?.mean(2)?)
}

/// Average pooling with a k×k window and stride k (PyTorch's `F.avg_pool2d(x, k)`, no padding;
/// trailing rows and columns that do not fill a window are dropped).
#[allow(dead_code)] // in the layer set (and tested); no model uses it yet: WRN's 8×8 pool is `global_avg_pool`
pub(crate) fn avg_pool2d(x: &Tensor, k: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (oh, ow) = (h / k, w / k);
    if k == 0 || oh == 0 || ow == 0 {
        return Err(Error::model(format!("avg_pool2d({k}) of a {h}×{w} map")));
    }
    let x = if oh * k != h || ow * k != w { x.narrow(2, 0, oh * k)?.narrow(3, 0, ow * k)? } else { x.clone() };
    // (B, C, oh, k, ow, k): mean over the window axes; plain reductions, so plain gradients.
    Ok(x.contiguous()?.reshape((b, c, oh, k, ow, k))?.mean_keepdim(5)?.mean_keepdim(3)?.reshape((b, c, oh, ow))?)
}

/// The input batch x [B, C·H·W] (flat images, as gathered) as [B, C, H, W], a view; an error
/// naming `model` when the sample size is not C·H·W.
pub(crate) fn images(x: &Tensor, image_shape: [usize; 3], model: &str) -> Result<Tensor> {
    let [c, h, w] = image_shape;
    let (batch, features) = x.dims2()?;
    if features != c * h * w {
        return Err(Error::model(format!(
            "the {model} takes images of {c}×{h}×{w} = {} values, got {features}",
            c * h * w
        )));
    }
    Ok(x.reshape((batch, c, h, w))?)
}

/// y = x·wᵀ + b for a hidden or head layer: x [B, in], w [out, in], b [out].
pub(crate) fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(matmul(x, &w.t()?)?.broadcast_add(b)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The gradients of Σ out·g for out = conv(x, w, padding, stride), by the definition:
    /// loops over every output position and kernel tap, in f64.
    fn brute_conv_grads(x: &Tensor, w: &Tensor, g: &Tensor, p: usize, s: usize) -> (Tensor, Tensor) {
        let (b, c, h, wd) = x.dims4().unwrap();
        let (o, _, k, _) = w.dims4().unwrap();
        let (_, _, oh, ow) = g.dims4().unwrap();
        let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let wv = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let gv = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (mut dx, mut dw) = (vec![0f64; xv.len()], vec![0f64; wv.len()]);
        for bi in 0..b {
            for oi in 0..o {
                for y in 0..oh {
                    for z in 0..ow {
                        let gg = gv[((bi * o + oi) * oh + y) * ow + z] as f64;
                        for ci in 0..c {
                            for i in 0..k {
                                for j in 0..k {
                                    let (yy, zz) =
                                        ((y * s + i) as isize - p as isize, (z * s + j) as isize - p as isize);
                                    if yy < 0 || zz < 0 || yy >= h as isize || zz >= wd as isize {
                                        continue;
                                    }
                                    let xi = ((bi * c + ci) * h + yy as usize) * wd + zz as usize;
                                    let wi = ((oi * c + ci) * k + i) * k + j;
                                    dx[xi] += gg * wv[wi] as f64;
                                    dw[wi] += gg * xv[xi] as f64;
                                }
                            }
                        }
                    }
                }
            }
        }
        let t = |v: Vec<f64>, shape: &[usize]| {
            Tensor::from_vec(v.into_iter().map(|x| x as f32).collect::<Vec<_>>(), shape, &Device::Cpu).unwrap()
        };
        (t(dx, x.dims()), t(dw, w.dims()))
    }

    /// `input_linear` and `conv2d` give candle's values and, for any stride, padding and input
    /// size (also those where the last rows do not fill a window, which candle's own conv
    /// backward gets wrong), the gradients by definition; no gradient for an input that does not
    /// track one.
    #[test]
    fn layer_ops_match_candle() {
        let dev = Device::Cpu;
        let loss = |t: &Tensor| t.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        for (k, padding, stride) in [
            (3, 1, 1),
            (3, 0, 1),
            (3, 2, 1),
            (5, 2, 1),
            (1, 0, 1),
            (3, 1, 2),
            (1, 0, 2),
            (3, 0, 2),
            (3, 1, 3),
            (5, 2, 2),
        ] {
            for (h, wd) in [(6, 5), (8, 8), (7, 7), (48, 45), (40, 30)] {
                let x = Var::randn(0f32, 1.0, (3, 2, h, wd), &dev).unwrap();
                let w = Var::randn(0f32, 1.0, (4, 2, k, k), &dev).unwrap();
                let ours = conv2d(&x, &w, padding, stride).unwrap();
                let reference = x.conv2d(&w, padding, stride, 1, 1).unwrap();
                assert_close(&ours, &reference, 1e-6);
                let (dx, dw) = brute_conv_grads(&x, &w, &ours.affine(2.0, 0.0).unwrap(), padding, stride);
                let g_ours = loss(&ours);
                assert_close(g_ours.get(&x).unwrap(), &dx, 1e-5);
                assert_close(g_ours.get(&w).unwrap(), &dw, 1e-5);
                // The backward pass conv2d takes off the CPU (candle's forward, `conv2d_backward`).
                let value = x.as_detached_tensor().conv2d(&w.as_detached_tensor(), padding, stride, 1, 1).unwrap();
                let off_cpu =
                    with_grads(&value, &x, &w, "conv2d", move |x, w, g| conv2d_backward(padding, stride, x, w, g));
                let g_off = loss(&off_cpu.unwrap());
                assert_close(g_off.get(&x).unwrap(), &dx, 1e-5);
                assert_close(g_off.get(&w).unwrap(), &dw, 1e-5);
                // Data input: no input gradient.
                let data = x.as_detached_tensor();
                let g = loss(&conv2d(&data, &w, padding, stride).unwrap());
                assert!(g.get(&data).is_none());
                assert_close(g.get(&w).unwrap(), &dw, 1e-5);
                // Fixed weights: input gradient only.
                let fixed = w.as_detached_tensor();
                let g = loss(&conv2d(&x, &fixed, padding, stride).unwrap());
                assert!(g.get(&fixed).is_none());
                assert_close(g.get(&x).unwrap(), &dx, 1e-5);
            }
        }
        assert!(conv2d(
            &Tensor::zeros((1, 1, 4, 4), candle_core::DType::F32, &dev).unwrap(),
            &Tensor::zeros((1, 1, 3, 3), candle_core::DType::F32, &dev).unwrap(),
            3,
            1
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

    /// Central finite differences in f64 of f at every coordinate of `x`, against the autograd
    /// gradient of Σ f(x)·r (r fixed random weights, so every output matters).
    fn check_fd(x: &[f64], shape: &[usize], f: &dyn Fn(&Tensor) -> Tensor) {
        let dev = Device::Cpu;
        let var = Var::from_vec(x.to_vec(), shape, &dev).unwrap();
        let out = f(var.as_tensor());
        let r = Tensor::randn(0f64, 1.0, out.dims(), &dev).unwrap();
        let objective = |t: &Tensor| (f(t) * &r).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
        let grads = (out * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g = grads.get(&var).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let eps = 1e-6;
        let gmax = g.iter().fold(1e-12f64, |m, v| m.max(v.abs()));
        for i in 0..x.len() {
            let mut up = x.to_vec();
            up[i] += eps;
            let mut down = x.to_vec();
            down[i] -= eps;
            let t = |v: Vec<f64>| Tensor::from_vec(v, shape, &dev).unwrap();
            let fd = (objective(&t(up)) - objective(&t(down))) / (2.0 * eps);
            assert!((fd - g[i]).abs() <= 1e-6 * gmax, "coordinate {i}: autograd {}, finite difference {fd}", g[i]);
        }
    }

    fn randn(n: usize, seed: u64) -> Vec<f64> {
        use rand::SeedableRng;
        use rand_distr::Distribution;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rand_distr::StandardNormal.sample(&mut rng)).collect()
    }

    /// Training-mode batch norm: gradients with respect to the input, γ and β match finite
    /// differences (through the group statistics), with 1 and 3 ghost batches.
    #[test]
    fn batch_norm_gradients_match_finite_differences() {
        let dev = Device::Cpu;
        let t = |v: Vec<f64>, s: &[usize]| Tensor::from_vec(v, s, &dev).unwrap();
        let (gamma, beta) = (t(randn(3, 1), &[3]), t(randn(3, 2), &[3]));
        for group in [6, 2] {
            let x = randn(6 * 3 * 2 * 2, 3);
            check_fd(&x, &[6, 3, 2, 2], &|x| batch_norm_train(x, &gamma, &beta, group, false).unwrap().0);
            let xt = t(x.clone(), &[6, 3, 2, 2]);
            check_fd(&randn(3, 4), &[3], &|g| batch_norm_train(&xt, g, &beta, group, false).unwrap().0);
            check_fd(&randn(3, 5), &[3], &|b| batch_norm_train(&xt, &gamma, b, group, false).unwrap().0);
        }
        // Each group is normalised on its own: mean 0 and variance 1/(1 + ε/var) per channel.
        let x = t(randn(4 * 2 * 3 * 3, 6), &[4, 2, 3, 3]);
        let ones = t(vec![1.0; 2], &[2]);
        let zeros = t(vec![0.0; 2], &[2]);
        let (y, mean, var) = batch_norm_train(&x, &ones, &zeros, 2, false).unwrap();
        assert_eq!(mean.dims(), [2, 2]);
        let y = y.reshape((2, 2, 2, 9)).unwrap();
        let m = y.mean_keepdim(3).unwrap().mean_keepdim(1).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        assert!(m.iter().all(|v| v.abs() < 1e-12), "{m:?}");
        let group0 = x.narrow(0, 0, 2).unwrap().transpose(0, 1).unwrap().flatten_from(1).unwrap();
        let direct = group0.var_keepdim(1).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap(); // unbiased
        let ours = var.get(0).unwrap().to_vec1::<f64>().unwrap(); // biased
        for (d, o) in direct.iter().zip(&ours) {
            assert!((d * 17.0 / 18.0 - o).abs() < 1e-12, "{d} {o}");
        }
        assert!(batch_norm_train(&x, &ones, &zeros, 3, false).is_err());
    }

    /// The fused CPU batch norm (+ ReLU) against the composition of candle ops it replaces
    /// (`batch_norm_train_ops`, then candle's ReLU): values, statistics and the gradients with
    /// respect to x, γ and β, in f64 and f32, with one and several ghost batches, odd sizes.
    #[test]
    fn cpu_batch_norm_matches_the_candle_ops() {
        let dev = Device::Cpu;
        for dtype in [candle_core::DType::F64, candle_core::DType::F32] {
            for (b, c, h, w, group) in [(6, 3, 5, 3, 2), (4, 5, 1, 1, 4), (8, 2, 7, 9, 8), (3, 4, 2, 3, 1)] {
                for relu in [false, true] {
                    let t = |n: usize, seed: u64, shape: &[usize], shift: f64| {
                        let v: Vec<f64> = randn(n, seed).into_iter().map(|v| v + shift).collect();
                        Var::from_tensor(&Tensor::from_vec(v, shape, &dev).unwrap().to_dtype(dtype).unwrap()).unwrap()
                    };
                    let x = t(b * c * h * w, 20, &[b, c, h, w], 0.7);
                    let gamma = t(c, 21, &[c], 0.0);
                    let beta = t(c, 22, &[c], 0.0);
                    let r = Tensor::randn(0f64, 1.0, (b, c, h, w), &dev).unwrap().to_dtype(dtype).unwrap();
                    let (ours, mean, var) = batch_norm_train(&x, &gamma, &beta, group, relu).unwrap();
                    let (reference, rmean, rvar) = batch_norm_train_ops(&x, &gamma, &beta, group).unwrap();
                    let reference = if relu { reference.relu().unwrap() } else { reference };
                    let tol = if dtype == candle_core::DType::F64 { 1e-12 } else { 2e-5 };
                    assert_close_any(&ours, &reference, tol);
                    assert_close_any(&mean, &rmean, tol);
                    assert_close_any(&var, &rvar, tol);
                    let g1 = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
                    let g2 = (&reference * &r).unwrap().sum_all().unwrap().backward().unwrap();
                    for v in [&x, &gamma, &beta] {
                        assert_close_any(g1.get(v).unwrap(), g2.get(v).unwrap(), tol * 10.0);
                    }
                }
            }
        }
    }

    /// The fused residual join: max(a + b, 0) and its gradient, against candle's add and ReLU.
    #[test]
    fn add_relu_matches_the_candle_ops() {
        let dev = Device::Cpu;
        let a = Var::randn(0f32, 1.0, (3, 4, 5, 7), &dev).unwrap();
        let b = Var::randn(0f32, 1.0, (3, 4, 5, 7), &dev).unwrap();
        let r = Tensor::randn(0f32, 1.0, (3, 4, 5, 7), &dev).unwrap();
        let ours = add_relu(&a, &b).unwrap();
        let reference = (a.as_tensor() + b.as_tensor()).unwrap().relu().unwrap();
        assert_close(&ours, &reference, 0.0);
        let g1 = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&reference * &r).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&a, &b] {
            assert_close(g1.get(v).unwrap(), g2.get(v).unwrap(), 0.0);
        }
    }

    /// Evaluation-mode batch norm is (x − mean) / √(var + ε) · γ + β.
    #[test]
    fn batch_norm_eval_is_the_affine_map() {
        let dev = Device::Cpu;
        let t = |v: &[f64], s: &[usize]| Tensor::from_slice(v, s, &dev).unwrap();
        let x = t(&[1.0, 2.0, 3.0, 4.0], &[1, 2, 1, 2]);
        let y = batch_norm_eval(
            &x,
            &t(&[2.0, 1.0], &[2]),
            &t(&[0.5, -1.0], &[2]),
            &t(&[1.0, 4.0], &[2]),
            &t(&[4.0, 1.0], &[2]),
        )
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
        let expect = [
            (1.0 - 1.0) / (4.0 + BN_EPS).sqrt() * 2.0 + 0.5,
            (2.0 - 1.0) / (4.0 + BN_EPS).sqrt() * 2.0 + 0.5,
            (3.0 - 4.0) / (1.0 + BN_EPS).sqrt() - 1.0,
            (4.0 - 4.0) / (1.0 + BN_EPS).sqrt() - 1.0,
        ];
        for (a, b) in y.iter().zip(expect) {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
    }

    #[test]
    fn pooling_and_linear_gradients_match_finite_differences() {
        check_fd(&randn(2 * 3 * 4 * 5, 7), &[2, 3, 4, 5], &|x| global_avg_pool(x).unwrap());
        check_fd(&randn(2 * 3 * 4 * 5, 8), &[2, 3, 4, 5], &|x| avg_pool2d(x, 2).unwrap());
        let x = Tensor::from_vec(randn(2 * 3 * 4 * 4, 9), (2, 3, 4, 4), &Device::Cpu).unwrap();
        let pooled = avg_pool2d(&x, 2).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let xs = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        assert!((pooled[0] - (xs[0] + xs[1] + xs[4] + xs[5]) / 4.0).abs() < 1e-12);
        let dev = Device::Cpu;
        let w = Tensor::from_vec(randn(12, 10), (4, 3), &dev).unwrap();
        let b = Tensor::from_vec(randn(4, 11), 4, &dev).unwrap();
        check_fd(&randn(6, 12), &[2, 3], &|x| linear(x, &w, &b).unwrap());
        let xin = Tensor::from_vec(randn(6, 13), (2, 3), &dev).unwrap();
        check_fd(&randn(12, 14), &[4, 3], &|w| linear(&xin, w, &b).unwrap());
    }

    /// `assert_close` for f32 or f64 tensors (compared in f64).
    fn assert_close_any(a: &Tensor, b: &Tensor, tol: f64) {
        assert_eq!(a.dims(), b.dims());
        let v =
            |t: &Tensor| t.flatten_all().unwrap().to_dtype(candle_core::DType::F64).unwrap().to_vec1::<f64>().unwrap();
        let (a, b) = (v(a), v(b));
        let scale = b.iter().fold(1.0f64, |m, v| m.max(v.abs()));
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!((x - y).abs() <= tol * scale, "[{i}] {x} vs {y}");
        }
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
}
