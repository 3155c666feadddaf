//! The paper's simple CNN: conv 3×3 with `filters[0]` channels (20), ReLU, conv 3×3 with
//! `filters[1]` channels (10), ReLU, flatten, linear to the logits.
//!
//! Convolutions use "same" padding (padding 1, stride 1), as flax's `nn.Conv` does by default, so
//! H and W are kept and the head sees filters[1]·H·W features. Tensors follow PyTorch's layout:
//! `conv.{i}.weight` [out, in, 3, 3], `conv.{i}.bias` [out], `head.weight` [classes, flat],
//! `head.bias` [classes]; the flattened feature index is (c, h, w) row-major (PyTorch's NCHW
//! flatten; flax flattens NHWC, which only permutes the rows of head.weight).

use candle_core::Tensor;

use super::activation::{conv, dense, LayerActivation};
use super::layers::{conv2d, images, matmul};
use super::registry::Kind;
use super::{Model, Pass};
use crate::error::{Error, Result};
use crate::layout::ParamLayout;

/// `model.kind = "cnn"`: `model.hidden` = the two filter counts.
pub const KIND: Kind = Kind {
    name: "cnn",
    about: "the paper's simple CNN: conv3x3-ReLU twice, linear head",
    keys: &["hidden"],
    defaults: |c| {
        c.hidden.get_or_insert_with(|| DEFAULT_FILTERS.to_vec());
    },
    validate: |c| match c.hidden.as_deref() {
        Some(&[a, b]) if a > 0 && b > 0 => Ok(()),
        h => Err(Error::config(
            "model.hidden",
            format!("the cnn takes two positive filter counts (the paper's: {DEFAULT_FILTERS:?}), got {h:?}"),
        )),
    },
    build: |c, image_shape, classes| {
        let f = c.hidden.as_deref().unwrap_or(&DEFAULT_FILTERS);
        Ok(Box::new(Cnn::new(image_shape, [f[0], f[1]], classes)))
    },
};

/// The paper's filter counts: 20 then 10.
pub const DEFAULT_FILTERS: [usize; 2] = [20, 10];

/// Kernel size and "same" padding of both convolutions.
const KERNEL: usize = 3;
const PADDING: usize = 1;

#[derive(Clone, Debug)]
pub struct Cnn {
    /// (C, H, W) of one input image.
    image_shape: [usize; 3],
    filters: [usize; 2],
    classes: usize,
    layout: ParamLayout,
}

impl Cnn {
    /// The CNN for images of shape (C, H, W). Sizes are not checked here; `model::build` rejects
    /// zeros with a config error.
    pub fn new(image_shape: [usize; 3], filters: [usize; 2], classes: usize) -> Self {
        let [c, h, w] = image_shape;
        let mut layout = ParamLayout::default();
        layout.push("conv.0.weight", &[filters[0], c, KERNEL, KERNEL]);
        layout.push("conv.0.bias", &[filters[0]]);
        layout.push("conv.1.weight", &[filters[1], filters[0], KERNEL, KERNEL]);
        layout.push("conv.1.bias", &[filters[1]]);
        layout.push("head.weight", &[classes, filters[1] * h * w]);
        layout.push("head.bias", &[classes]);
        Self { image_shape, filters, classes, layout }
    }
}

impl Model for Cnn {
    fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    /// conv block 0, conv block 1, head.
    fn segments(&self) -> usize {
        3
    }

    fn forward_segment(&self, params: &[Tensor], k: usize, h: &Tensor, _: &mut Pass) -> Result<Tensor> {
        let [w0, b0, w1, b1, wh, bh] = params else {
            return Err(Error::model(format!("the cnn takes 6 tensors, got {}", params.len())));
        };
        let bias = |b: &Tensor, f: usize| b.reshape((1, f, 1, 1));
        match k {
            0 => {
                let x = images(h, self.image_shape, "cnn")?; // (B, C, H, W), a view
                                                             // model::conv2d: x is data, so the first conv computes no input gradient.
                Ok(conv2d(&x, w0, PADDING, 1)?.broadcast_add(&bias(b0, self.filters[0])?)?.relu()?)
                // (B, F0, H, W)
            }
            1 => Ok(conv2d(h, w1, PADDING, 1)?.broadcast_add(&bias(b1, self.filters[1])?)?.relu()?), // (B, F1, H, W)
            2 => Ok(matmul(&h.flatten_from(1)?, &wh.t()?)?.broadcast_add(bh)?),                      // (B, classes)
            _ => Err(Error::model(format!("the cnn has 3 segments, not {}", k + 1))),
        }
    }

    fn describe(&self) -> String {
        let [c, h, w] = self.image_shape;
        format!(
            "cnn {c}x{h}x{w} conv3x3-{}-conv3x3-{}-linear-{} (ReLU, same padding), {} params",
            self.filters[0],
            self.filters[1],
            self.classes,
            self.layout.len()
        )
    }

    fn activations(&self, threads: usize) -> Vec<LayerActivation> {
        let [c, h, w] = self.image_shape;
        let [f0, f1] = self.filters;
        vec![
            conv(c, f0, KERNEL, h * w, h * w, threads),
            conv(f0, f1, KERNEL, h * w, h * w, threads),
            dense(f1 * h * w, self.classes, false, true),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Pass;
    use candle_core::Device;

    #[test]
    fn default_layout() {
        let m = Cnn::new([1, 28, 28], DEFAULT_FILTERS, 10);
        let expect: [(&str, &[usize]); 6] = [
            ("conv.0.weight", &[20, 1, 3, 3]),
            ("conv.0.bias", &[20]),
            ("conv.1.weight", &[10, 20, 3, 3]),
            ("conv.1.bias", &[10]),
            ("head.weight", &[10, 7840]),
            ("head.bias", &[10]),
        ];
        let l = m.layout();
        crate::layout::assert_contiguous(l, &expect);
        assert_eq!(l.len(), 180 + 20 + 1800 + 10 + 78_400 + 10);
        assert_eq!(l.len(), 80_420);
        assert!(m.describe().ends_with("80420 params"), "{}", m.describe());
    }

    /// One channel, one filter per conv with only the centre tap set: each conv is a pointwise
    /// scale, so the logits are easy to compute by hand.
    #[test]
    fn forward_by_hand() {
        let m = Cnn::new([1, 2, 2], [1, 1], 2);
        let dev = Device::Cpu;
        let t = |v: &[f32], s: &[usize]| Tensor::from_slice(v, s, &dev).unwrap();
        let centre = |s: f32| {
            let mut k = [0.0f32; 9];
            k[4] = s;
            t(&k, &[1, 1, 3, 3])
        };
        let params = [
            centre(2.0),
            t(&[-1.0], &[1]), // h0 = relu(2x − 1)
            centre(1.0),
            t(&[0.5], &[1]), // h1 = h0 + 0.5 (h0 ≥ 0)
            t(&[1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0], &[2, 4]),
            t(&[0.0, 1.0], &[2]),
        ];
        // x = [1, 0, 2, −3] → h0 = [1, 0, 3, 0] → h1 = [1.5, .5, 3.5, .5] → y = [6, 2.5]
        let x = t(&[1.0, 0.0, 2.0, -3.0], &[1, 4]);
        let y = m.forward(&params, &x, &mut Pass::train()).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(y, vec![vec![6.0, 2.5]]);
        assert!(m.forward(&params, &t(&[1.0; 5], &[1, 5]), &mut Pass::train()).is_err());
    }

    /// "same" padding: a 3×3 all-ones kernel sums each pixel's neighbourhood, zero outside.
    #[test]
    fn same_padding() {
        let m = Cnn::new([1, 3, 3], [1, 1], 9);
        let dev = Device::Cpu;
        let t = |v: &[f32], s: &[usize]| Tensor::from_slice(v, s, &dev).unwrap();
        let mut centre = [0.0f32; 9];
        centre[4] = 1.0;
        let mut eye = vec![0.0f32; 81];
        for i in 0..9 {
            eye[i * 9 + i] = 1.0;
        }
        let params = [
            t(&[1.0; 9], &[1, 1, 3, 3]),
            t(&[0.0], &[1]),
            t(&centre, &[1, 1, 3, 3]),
            t(&[0.0], &[1]),
            t(&eye, &[9, 9]),
            t(&[0.0; 9], &[9]),
        ];
        let x = t(&[1.0; 9], &[1, 9]);
        let y = m.forward(&params, &x, &mut Pass::train()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(y, [4.0, 6.0, 4.0, 6.0, 9.0, 6.0, 4.0, 6.0, 4.0]);
    }
}
