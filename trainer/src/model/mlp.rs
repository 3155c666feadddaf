//! The multilayer perceptron of the paper's MLP experiments: fully connected layers with ReLU
//! between them and none after the last (the logits), 784-500-500-500-10 by default.
//!
//! Tensor names and shapes follow PyTorch's `nn.Linear`, so weights move between the two without
//! renaming: `layers.{i}.weight` [out, in] and `layers.{i}.bias` [out], i = 0..=hidden.len(),
//! and y = x·Wᵀ + b.

use candle_core::Tensor;

use super::activation::{native_dense, LayerActivation};
use super::layers::input_linear;
use super::native::{
    bias_relu, bias_relu_from_t, column_sums, cross_entropy_grad, matmul, relu_backward, sized, Mat, NativeGrad,
    Workspace,
};
use super::registry::Kind;
use super::{Model, Pass};
use crate::error::{Error, Result};
use crate::layout::ParamLayout;

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
            h.matmul(&w.t()?)?
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
        let params = &self.layout.params;
        ws.outputs.resize_with(layers, Vec::new);
        // Forward.
        for l in 0..layers {
            let (done, rest) = ws.outputs.split_at_mut(l);
            let input = if l == 0 { x } else { &done[l - 1][..] };
            let out = sized(&mut rest[0], m * w[l + 1]);
            let weight = Mat::row_major(&theta[params[2 * l].range()], w[l + 1], w[l]);
            let (bias, relu) = (&theta[params[2 * l + 1].range()], l + 1 < layers);
            if m < TRANSPOSED_BELOW {
                let t = sized(&mut ws.scratch, m * w[l + 1]);
                matmul(t, weight, Mat::row_major(input, m, w[l]).t(), false)?;
                bias_relu_from_t(out, t, bias, relu);
            } else {
                matmul(out, Mat::row_major(input, m, w[l]), weight.t(), false)?;
                bias_relu(out, bias, relu);
            }
        }
        // Loss; δ of the logits.
        let [delta, below] = &mut ws.delta;
        let loss = cross_entropy_grad(&ws.outputs[layers - 1], target, classes, scale, sized(delta, m * classes));
        // Backward.
        for l in (0..layers).rev() {
            let input = if l == 0 { x } else { &ws.outputs[l - 1][..] };
            let d = Mat::row_major(&delta[..m * w[l + 1]], m, w[l + 1]);
            matmul(&mut grad[params[2 * l].range()], d.t(), Mat::row_major(input, m, w[l]), accumulate)?;
            column_sums(d.data, w[l + 1], &mut grad[params[2 * l + 1].range()], accumulate);
            if l > 0 {
                let weight = Mat::row_major(&theta[params[2 * l].range()], w[l + 1], w[l]);
                let next = sized(below, m * w[l]);
                matmul(next, d, weight, false)?;
                relu_backward(next, input);
                std::mem::swap(delta, below);
            }
        }
        Ok(loss)
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
