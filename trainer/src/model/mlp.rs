//! The multilayer perceptron of the paper's MLP experiments: fully connected layers with ReLU
//! between them and none after the last (the logits), 784-500-500-500-10 by default.
//!
//! Tensor names and shapes follow PyTorch's `nn.Linear`, so weights move between the two without
//! renaming: `layers.{i}.weight` [out, in] and `layers.{i}.bias` [out], i = 0..=hidden.len(),
//! and y = x·Wᵀ + b.

use std::sync::atomic::AtomicUsize;

use candle_core::Tensor;

use super::activation::{native_dense, LayerActivation};
use super::layers::{input_linear, matmul};
use super::native::{
    bias_relu, bias_relu_from_t, column_sums, cross_entropy_grad, relu_backward, sized, Mat, NativeGrad, Product,
    Workspace,
};
use super::registry::Kind;
use super::{Model, Pass};
use crate::error::{Error, Result};
use crate::layout::ParamLayout;
use crate::team::{self, Member, Shared};

/// `model.kind = "mlp"`: `model.hidden` = the hidden widths.
pub const KIND: Kind = Kind {
    name: "mlp",
    about: "fully connected, ReLU (the paper's 784-500-500-500-10)",
    keys: &["hidden"],
    defaults: |c| {
        c.hidden.get_or_insert_with(|| DEFAULT_HIDDEN.to_vec());
    },
    validate: |c| {
        if c.hidden.as_deref().unwrap_or_default().contains(&0) {
            return Err(Error::config("model.hidden", format!("widths must be positive, got {:?}", c.hidden)));
        }
        Ok(())
    },
    build: |c, image_shape, classes| {
        let hidden = c.hidden.clone().unwrap_or_else(|| DEFAULT_HIDDEN.to_vec());
        Ok(Box::new(Mlp::new(image_shape.iter().product(), &hidden, classes)))
    },
};

/// The paper's hidden widths: three layers of 500 (SPEC §7).
pub const DEFAULT_HIDDEN: [usize; 3] = [500, 500, 500];

#[derive(Clone, Debug)]
pub struct Mlp {
    /// input, hidden..., classes
    widths: Vec<usize>,
    layout: ParamLayout,
}

impl Mlp {
    /// An MLP from `input` features through `hidden` widths to `classes` logits. `hidden` may be
    /// empty (multinomial logistic regression). Widths are not checked here; `model::build`
    /// rejects zeros with a config error.
    pub fn new(input: usize, hidden: &[usize], classes: usize) -> Self {
        let mut widths = Vec::with_capacity(hidden.len() + 2);
        widths.push(input);
        widths.extend_from_slice(hidden);
        widths.push(classes);
        let mut layout = ParamLayout::default();
        for (i, w) in widths.windows(2).enumerate() {
            layout.push(format!("layers.{i}.weight"), &[w[1], w[0]]); // (out, in)
            layout.push(format!("layers.{i}.bias"), &[w[1]]); // (out)
        }
        Self { widths, layout }
    }

    /// input, hidden..., classes
    pub fn widths(&self) -> &[usize] {
        &self.widths
    }
}

impl Model for Mlp {
    fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    fn segments(&self) -> usize {
        self.widths.len() - 1
    }

    /// Layer k: x·Wᵀ + b, then ReLU except after the last layer.
    fn forward_segment(&self, params: &[Tensor], k: usize, h: &Tensor, _: &mut Pass) -> Result<Tensor> {
        let layers = self.segments();
        if k >= layers || params.len() != 2 * layers {
            return Err(Error::model(format!(
                "the mlp has {layers} layers; segment {k} with {} tensors",
                params.len()
            )));
        }
        let (w, b) = (&params[2 * k], &params[2 * k + 1]);
        let z = if k == 0 {
            let (_, features) = h.dims2()?;
            if features != self.widths[0] {
                return Err(Error::model(format!("the mlp takes {} input features, got {features}", self.widths[0])));
            }
            // The input is data: the first layer skips candle's gradient with respect to it.
            input_linear(h, w)?
        } else {
            matmul(h, &w.t()?)?
        };
        let z = z.broadcast_add(b)?; // (B, out)
        Ok(if k + 1 < layers { z.relu()? } else { z })
    }

    fn describe(&self) -> String {
        let widths: Vec<String> = self.widths.iter().map(|w| w.to_string()).collect();
        format!("mlp {} (ReLU), {} params", widths.join("-"), self.layout.len())
    }

    /// The native path's (`native_dense`): the planner plans host memory, where `ModelField`
    /// runs the MLP on its own gradient code (candle's autograd keeps ~3× more: `dense`).
    fn activations(&self, _threads: usize) -> Vec<LayerActivation> {
        let n = self.widths.len() - 1;
        (0..n).map(|i| native_dense(self.widths[i], self.widths[i + 1], i == 0, i + 1 == n)).collect()
    }

    fn native(&self) -> Option<&dyn NativeGrad> {
        Some(self)
    }
}

/// Micro-batches smaller than this form each layer's product transposed (`bias_relu_from_t`);
/// from 128 rows on both orders ran at the GEMM's full speed.
const TRANSPOSED_BELOW: usize = 128;

/// The MLP's own gradient (`native`): forward, each layer's output = input · Wᵀ (one GEMM),
/// then + bias and ReLU in one pass, saved; the loss and its logit gradient δ in one
/// pass; backward from the last layer, ∇W (+)= δᵀ · input (one GEMM straight into θ's gradient
/// range), ∇b (+)= column sums of δ, and for every layer but the first δ ← (δ · W) ⊙ [output of
/// the layer below > 0] (the input images get no gradient).
impl NativeGrad for Mlp {
    fn loss_and_grad(
        &self,
        theta: &[f32],
        x: &[f32],
        target: &[f32],
        m: usize,
        scale: f32,
        grad: &mut [f32],
        accumulate: bool,
        ws: &mut Workspace,
    ) -> Result<f64> {
        let w = &self.widths;
        let layers = w.len() - 1;
        let classes = w[layers];
        let p = self.layout.len();
        if theta.len() != p || grad.len() != p || x.len() != m * w[0] || target.len() != m * classes {
            return Err(Error::model(format!(
                "the mlp's native gradient: θ {} and gradient {} values (the layout has {p}), \
                 input {} (m = {m} × {}), target {} (× {classes})",
                theta.len(),
                grad.len(),
                x.len(),
                w[0],
                target.len()
            )));
        }
        // Every buffer sized before the team starts (members cannot resize shared buffers).
        let transposed = m < TRANSPOSED_BELOW;
        let widest = w[1..].iter().copied().max().unwrap_or(0);
        ws.outputs.resize_with(layers, Vec::new);
        for (l, out) in ws.outputs.iter_mut().enumerate() {
            sized(out, m * w[l + 1]);
        }
        for d in &mut ws.delta {
            sized(d, m * widest);
        }
        sized(&mut ws.scratch, if transposed { m * widest } else { 0 });
        let losses = sized(&mut ws.losses, m);
        let bufs = Buffers {
            outputs: ws.outputs.iter_mut().map(|o| Shared::new(o)).collect(),
            delta: ws.delta.each_mut().map(|d| Shared::new(d)),
            scratch: Shared::new(&mut ws.scratch),
            losses: Shared::new(losses),
            grad: Shared::new(grad),
            claims: (0..2 * layers).map(|_| AtomicUsize::new(0)).collect(),
        };
        // A team for the whole evaluation (forward, loss, backward; see `team`): its members
        // take their block of every product and pass and meet at a barrier between layers.
        let size = team::size_for(3 * m * p, MIN_MACS_PER_MEMBER);
        let failed = std::sync::Mutex::new(None);
        team::run(size, |me| {
            if let Err(e) = self.member_pass(me, theta, x, target, m, scale, accumulate, &bufs) {
                failed.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
            }
        });
        if let Some(e) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(e);
        }
        Ok(ws.losses.iter().map(|&l| l as f64).sum())
    }
}

/// A team starts only for evaluations of at least this many multiply-adds per member: below,
/// waking a second thread costs more than half the work.
const MIN_MACS_PER_MEMBER: usize = 1 << 20;

/// The workspace's buffers as the team members share them.
struct Buffers<'a> {
    outputs: Vec<Shared<'a, f32>>,
    delta: [Shared<'a, f32>; 2],
    scratch: Shared<'a, f32>,
    losses: Shared<'a, f32>,
    grad: Shared<'a, f32>,
    /// One task counter per phase (a layer's forward, or its backward).
    claims: Vec<AtomicUsize>,
}

/// Columns of the bias gradient per task.
const BIAS_COLUMNS: usize = 128;

impl Mlp {
    /// One team member's share of `loss_and_grad`. Every member takes the same branches (they
    /// depend on shapes only), so an error stops them all at the same point, never one at a
    /// barrier the others do not reach.
    ///
    /// SAFETY of the shared buffers: between two `sync`s each member writes only its own block
    /// of one buffer (its block of a product, the same block's epilogue, its rows of the loss,
    /// its columns of a bias gradient), and reads only buffers no one writes in that phase.
    #[allow(clippy::too_many_arguments)]
    fn member_pass(
        &self,
        me: &Member,
        theta: &[f32],
        x: &[f32],
        target: &[f32],
        m: usize,
        scale: f32,
        accumulate: bool,
        bufs: &Buffers,
    ) -> Result<()> {
        let w = &self.widths;
        let layers = w.len() - 1;
        let classes = w[layers];
        let params = &self.layout.params;
        let weight = |l: usize| Mat::row_major(&theta[params[2 * l].range()], w[l + 1], w[l]);
        // SAFETY (for every `get`): the layer below's output is complete after the sync that
        // ended its phase, and nobody writes it again during this evaluation.
        let input = |l: usize| if l == 0 { x } else { unsafe { &bufs.outputs[l - 1].get()[..m * w[l]] } };
        let transposed = m < TRANSPOSED_BELOW;
        let mut phases = bufs.claims.iter();
        let mut next_counter = || phases.next().ok_or_else(|| Error::internal("mlp: too few phase counters"));
        // Forward: blocks of each layer's product, each followed by its epilogue.
        for l in 0..layers {
            let out = bufs.outputs[l];
            let (bias, relu) = (&theta[params[2 * l + 1].range()], l + 1 < layers);
            let counter = next_counter()?;
            if transposed {
                let t = bufs.scratch.prefix(m * w[l + 1]);
                let product = Product::new(t, weight(l), Mat::row_major(input(l), m, w[l]).t(), false, me.size)?;
                // SAFETY: a claimed block of t is this member's alone, complete after `block`;
                // the same block, transposed, of out is written by it alone.
                me.claim(counter, product.blocks, |i| unsafe {
                    let (split, r) = product.block(i);
                    bias_relu_from_t(out, t, bias, relu, split, &r);
                });
            } else {
                let product = Product::new(out, Mat::row_major(input(l), m, w[l]), weight(l).t(), false, me.size)?;
                me.claim(counter, product.blocks, |i| unsafe {
                    let (split, r) = product.block(i);
                    bias_relu(out, bias, relu, split, &r);
                });
            }
            me.sync();
        }
        // Loss; δ of the logits, each member its rows.
        let rows = me.part(m, 1);
        let (lo, hi) = (rows.start * classes, rows.end * classes);
        unsafe {
            let logits = &bufs.outputs[layers - 1].get()[lo..hi];
            let delta = bufs.delta[0].range(lo..hi).get_mut();
            cross_entropy_grad(logits, &target[lo..hi], classes, scale, delta, bufs.losses.range(rows).get_mut());
        }
        me.sync();
        // Backward: δ in delta[cur], the layer below's into delta[1 − cur]. One phase per layer,
        // its tasks claimed from one counter: the blocks of δ · W (then ReLU's backward on the
        // block), of ∇W = δᵀ · input, and of the bias gradient's columns.
        let mut cur = 0;
        for l in (0..layers).rev() {
            let (delta, below) = (bufs.delta[cur], bufs.delta[1 - cur]);
            // SAFETY: δ of this layer was completed before the last sync; this phase only reads it.
            let d = Mat::row_major(unsafe { &delta.get()[..m * w[l + 1]] }, m, w[l + 1]);
            let gw = bufs.grad.range(params[2 * l].range());
            let dw = Product::new(gw, d.t(), Mat::row_major(input(l), m, w[l]), accumulate, me.size)?;
            let next = below.prefix(m * w[l]);
            let dx = if l > 0 { Some(Product::new(next, d, weight(l), false, me.size)?) } else { None };
            let n_dx = dx.as_ref().map_or(0, |p| p.blocks);
            let bias_range = params[2 * l + 1].range();
            let n_bias = w[l + 1].div_ceil(BIAS_COLUMNS);
            let counter = next_counter()?;
            // SAFETY: each task writes only its own block of `next`, of ∇W or of ∇b.
            me.claim(counter, n_dx + dw.blocks + n_bias, |i| unsafe {
                if let Some(dx) = dx.as_ref().filter(|_| i < n_dx) {
                    let (split, r) = dx.block(i);
                    relu_backward(next, input(l), w[l], split, &r);
                } else if i < n_dx + dw.blocks {
                    dw.block(i - n_dx);
                } else {
                    let c = i - n_dx - dw.blocks;
                    let cols = c * BIAS_COLUMNS..((c + 1) * BIAS_COLUMNS).min(w[l + 1]);
                    let gb = bufs.grad.range(bias_range.start + cols.start..bias_range.start + cols.end);
                    column_sums(d.data, w[l + 1], cols, gb.get_mut(), accumulate);
                }
            });
            if l > 0 {
                cur = 1 - cur;
            }
            me.sync();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Pass;
    use candle_core::Device;

    #[test]
    fn default_layout() {
        let m = Mlp::new(784, &DEFAULT_HIDDEN, 10);
        let l = m.layout();
        assert_eq!(l.len(), 784 * 500 + 500 + 500 * 500 + 500 + 500 * 500 + 500 + 500 * 10 + 10);
        // 392 500 + 250 500 + 250 500 + 5 010 (648 010 would be two hidden layers, 784-500-500-10).
        assert_eq!(l.len(), 898_510);
        let expect: [(&str, &[usize]); 8] = [
            ("layers.0.weight", &[500, 784]),
            ("layers.0.bias", &[500]),
            ("layers.1.weight", &[500, 500]),
            ("layers.1.bias", &[500]),
            ("layers.2.weight", &[500, 500]),
            ("layers.2.bias", &[500]),
            ("layers.3.weight", &[10, 500]),
            ("layers.3.bias", &[10]),
        ];
        crate::layout::assert_contiguous(l, &expect);
        assert_eq!(l.get("layers.1.weight").unwrap().offset, 392_500);
        assert_eq!(m.describe(), "mlp 784-500-500-500-10 (ReLU), 898510 params");
    }

    /// The native gradient computed by a team of two (each product, epilogue and loss row split
    /// between the members) equals the one-thread computation up to the GEMM's blocking: both
    /// product orders (transposed below `TRANSPOSED_BELOW` rows, direct above), rows and columns
    /// splits, accumulation. (On a one-core machine rayon has one thread and both runs are the
    /// same: the comparison then holds trivially.)
    #[test]
    fn a_team_of_two_computes_what_one_thread_does() {
        let model = Mlp::new(50, &[37, 300, 19], 7);
        let p = model.layout.len();
        let theta: Vec<f32> = (0..p).map(|i| (i as f32 * 0.61).sin() * 0.2).collect();
        for m in [16, 200] {
            let x: Vec<f32> = (0..m * 50).map(|i| (i as f32 * 0.37).cos()).collect();
            let mut target = vec![0.0f32; m * 7];
            for b in 0..m {
                target[b * 7 + b % 7] = 1.0;
            }
            let mut results = Vec::new();
            for size in [1, 2] {
                crate::team::FORCED_SIZE.set(Some(size));
                let mut ws = Workspace::default();
                let mut grad = vec![f32::NAN; p];
                let loss = model.loss_and_grad(&theta, &x, &target, m, 0.5, &mut grad, false, &mut ws).unwrap();
                // Accumulating a second time doubles it.
                let again = model.loss_and_grad(&theta, &x, &target, m, 0.5, &mut grad, true, &mut ws).unwrap();
                crate::team::FORCED_SIZE.set(None);
                assert_eq!(loss, again);
                results.push((loss, grad));
            }
            let ((l1, g1), (l2, g2)) = (&results[0], &results[1]);
            assert!((l1 - l2).abs() <= 1e-6 * l1.abs(), "m {m}: loss {l1} vs {l2}");
            let gmax = g1.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            assert!(gmax > 0.0 && g2.iter().all(|v| v.is_finite()));
            for i in 0..p {
                assert!((g1[i] - g2[i]).abs() <= 1e-5 * gmax, "m {m}, coordinate {i}: {} vs {}", g1[i], g2[i]);
            }
        }
    }

    /// forward against a hand computation: 2-2-2 with ReLU in the middle.
    #[test]
    fn forward_by_hand() {
        let m = Mlp::new(2, &[2], 2);
        let dev = Device::Cpu;
        let t = |v: &[f32], s: &[usize]| Tensor::from_slice(v, s, &dev).unwrap();
        let params = [
            t(&[1.0, 2.0, -1.0, 0.5], &[2, 2]), // h = relu([x0 + 2 x1, −x0 + 0.5 x1] + b0)
            t(&[0.0, -1.0], &[2]),
            t(&[1.0, 0.0, 1.0, -1.0], &[2, 2]), // y = [h0, h0 − h1] + b1
            t(&[0.5, 0.0], &[2]),
        ];
        let x = t(&[1.0, 1.0, -2.0, 4.0], &[2, 2]);
        // sample 0: z = [3, −1.5] → h = [3, 0] → y = [3.5, 3]
        // sample 1: z = [6, 3]   → h = [6, 3] → y = [6.5, 3]
        let y = m.forward(&params, &x, &mut Pass::train()).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(y, vec![vec![3.5, 3.0], vec![6.5, 3.0]]);
        // Wrong shapes are errors, not panics.
        assert!(m.forward(&params[..3], &x, &mut Pass::train()).is_err());
        assert!(m.forward(&params, &t(&[1.0; 6], &[2, 3]), &mut Pass::train()).is_err());
    }
}
