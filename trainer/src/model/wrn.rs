//! `model.kind = "wrn"`: Wide-ResNet `model.depth` × `model.widen` (Zagoruyko & Komodakis 2016;
//! 28 × 10 by default), with pre-activation basic blocks: a 3×3 stem conv to 16 channels, three
//! groups of n = (depth − 4) / 6 blocks with 16k, 32k and 64k channels (k = widen; the 2nd and
//! 3rd groups start with stride 2), then batch norm, ReLU, global average pooling (the paper's
//! 8×8 average pool on CIFAR) and a linear head. A block computes
//! o = ReLU(BN1(x)); y = conv3×3(o, stride); y = conv3×3(ReLU(BN2(y))); out = y + shortcut,
//! where the shortcut is x, or a 1×1 conv of o when the shape changes. No dropout (the paper's
//! CIFAR numbers without it are the ones kutta's recipes use).
//!
//! Tensor names follow the widely used PyTorch port (xternalz/WideResNet-pytorch):
//! `conv1.weight`, `block1.layer.0.bn1.weight`, `block1.layer.0.conv1.weight`,
//! `block1.layer.0.convShortcut.weight`, …, `bn1.weight` (the final norm), `fc.weight`, `fc.bias`.
//! Initialisation: convs He normal (fan_out), batch norm γ = 1, β = 0, the head PyTorch's
//! `nn.Linear` default. Segments: the stem, each block, the head.

use candle_core::Tensor;

use super::activation::{conv_bn, dense, residual_stack, LayerActivation};
use super::layers::{conv2d, global_avg_pool, images, linear};
use super::registry::{bn_defaults, bn_keys, Kind};
use super::{conv_weight, Bn, Model, Pass};
use crate::error::{Error, Result};
use crate::layout::{Init, ParamLayout};

pub const DEFAULT_DEPTH: usize = 28;
pub const DEFAULT_WIDEN: usize = 10;

/// `model.kind = "wrn"`: `model.depth`, `model.widen`, `model.bn_group`, `model.bn_momentum`.
pub const KIND: Kind = Kind {
    name: "wrn",
    about: "Wide-ResNet depth x widen, pre-activation blocks (28x10 by default)",
    keys: &["depth", "widen", "bn_group", "bn_momentum"],
    defaults: |c| {
        c.depth.get_or_insert(DEFAULT_DEPTH);
        c.widen.get_or_insert(DEFAULT_WIDEN);
        bn_defaults(c);
    },
    validate: |c| {
        let depth = c.depth.unwrap_or(DEFAULT_DEPTH);
        if depth < 10 || (depth - 4) % 6 != 0 {
            return Err(Error::config(
                "model.depth",
                format!("must be 6n + 4 with n ≥ 1 (10, 16, 22, 28, 40, …), got {depth}"),
            ));
        }
        if c.widen == Some(0) {
            return Err(Error::config("model.widen", "must be at least 1"));
        }
        bn_keys(c).map(|_| ())
    },
    build: |c, image_shape, classes| {
        let (group, momentum) = bn_keys(c)?;
        let (depth, widen) = (c.depth.unwrap_or(DEFAULT_DEPTH), c.widen.unwrap_or(DEFAULT_WIDEN));
        Ok(Box::new(WideResNet::new(image_shape, depth, widen, classes, group, momentum)))
    },
};

#[derive(Clone, Debug)]
struct Block {
    bn1: Bn,
    conv1: usize,
    bn2: Bn,
    conv2: usize,
    shortcut: Option<usize>,
    stride: usize,
    c_in: usize,
    c_out: usize,
}

#[derive(Clone, Debug)]
pub struct WideResNet {
    image_shape: [usize; 3],
    depth: usize,
    widen: usize,
    classes: usize,
    bn_group: usize,
    bn_momentum: f64,
    layout: ParamLayout,
    state: ParamLayout,
    conv1: usize,
    blocks: Vec<Block>,
    bn: Bn,
    fc: usize,
}

impl WideResNet {
    pub fn new(
        image_shape: [usize; 3],
        depth: usize,
        widen: usize,
        classes: usize,
        bn_group: usize,
        bn_momentum: f64,
    ) -> Self {
        let n = (depth - 4) / 6;
        let (mut layout, mut state) = (ParamLayout::default(), ParamLayout::default());
        let conv1 = conv_weight(&mut layout, "conv1.weight".into(), 16, image_shape[0], 3);
        let mut blocks = Vec::new();
        let mut c_in = 16;
        for g in 0..3 {
            let c_out = (16 << g) * widen;
            for i in 0..n {
                let stride = if g > 0 && i == 0 { 2 } else { 1 };
                let p = format!("block{}.layer.{i}", g + 1);
                let bn1 = Bn::declare(&mut layout, &mut state, &format!("{p}.bn1"), c_in);
                let conv1 = conv_weight(&mut layout, format!("{p}.conv1.weight"), c_out, c_in, 3);
                let bn2 = Bn::declare(&mut layout, &mut state, &format!("{p}.bn2"), c_out);
                let conv2 = conv_weight(&mut layout, format!("{p}.conv2.weight"), c_out, c_out, 3);
                let shortcut = (c_in != c_out || stride != 1)
                    .then(|| conv_weight(&mut layout, format!("{p}.convShortcut.weight"), c_out, c_in, 1));
                blocks.push(Block { bn1, conv1, bn2, conv2, shortcut, stride, c_in, c_out });
                c_in = c_out;
            }
        }
        let bn = Bn::declare(&mut layout, &mut state, "bn1", c_in);
        let fc = layout.params.len();
        layout.push_init("fc.weight", &[classes, c_in], Init::TorchLinear { fan_in: c_in });
        layout.push_init("fc.bias", &[classes], Init::TorchLinear { fan_in: c_in });
        Self { image_shape, depth, widen, classes, bn_group, bn_momentum, layout, state, conv1, blocks, bn, fc }
    }

    /// Spatial size (H, W) after the first `blocks` blocks.
    #[cfg(test)]
    fn spatial(&self, blocks: usize) -> (usize, usize) {
        super::spatial_after(self.image_shape, self.blocks[..blocks].iter().map(|b| b.stride))
    }
}

impl Model for WideResNet {
    fn layout(&self) -> &ParamLayout {
        &self.layout
    }
    fn state_layout(&self) -> &ParamLayout {
        &self.state
    }
    fn state_momentum(&self) -> f64 {
        self.bn_momentum
    }
    fn batch_multiple(&self) -> usize {
        self.bn_group
    }
    fn segments(&self) -> usize {
        self.blocks.len() + 2
    }

    fn forward_segment(&self, params: &[Tensor], k: usize, h: &Tensor, pass: &mut Pass) -> Result<Tensor> {
        let g = self.bn_group;
        if k == 0 {
            return conv2d(&images(h, self.image_shape, "wrn")?, &params[self.conv1], 1, 1);
        }
        if let Some(b) = self.blocks.get(k - 1) {
            let o = b.bn1.forward_relu(params, h, g, pass)?;
            let y = conv2d(&o, &params[b.conv1], 1, b.stride)?;
            let y = b.bn2.forward_relu(params, &y, g, pass)?;
            let y = conv2d(&y, &params[b.conv2], 1, 1)?;
            let shortcut = match b.shortcut {
                Some(w) => conv2d(&o, &params[w], 0, b.stride)?,
                None => h.clone(),
            };
            return Ok((y + shortcut)?);
        }
        if k == self.blocks.len() + 1 {
            let o = self.bn.forward_relu(params, h, g, pass)?;
            return linear(&global_avg_pool(&o)?, &params[self.fc], &params[self.fc + 1]);
        }
        Err(Error::model(format!("the wrn has {} segments, not {}", self.segments(), k + 1)))
    }

    fn describe(&self) -> String {
        let [c, h, w] = self.image_shape;
        format!(
            "wrn-{}-{} {c}x{h}x{w} (pre-activation, ghost batch norm over {}), {} classes, {} params",
            self.depth,
            self.widen,
            self.bn_group,
            self.classes,
            self.layout.len()
        )
    }

    fn activations(&self, threads: usize) -> Vec<LayerActivation> {
        let [c, h, w] = self.image_shape;
        let mut out = vec![conv_bn(c, 16, 3, h * w, h * w, threads)];
        let blocks = self.blocks.iter().map(|b| (b.c_in, b.c_out, b.stride, b.shortcut.is_some()));
        let (stack, hw_out) = residual_stack(self.image_shape, blocks, threads);
        out.extend(stack);
        let last = self.blocks.last().map_or(16, |b| b.c_out);
        let mut head = dense(last, self.classes, false, true);
        head.name = format!("BN+ReLU+avgpool + {}", head.name);
        head.kept += 6 * last * hw_out;
        head.eval += 2 * last * hw_out;
        out.push(head);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gradient_matches_finite_differences() {
        let m = WideResNet::new([2, 6, 6], 10, 1, 3, 2, 0.1);
        crate::model::resnet::tests::check_model_gradient(&m, [2, 6, 6], 4);
    }

    /// WRN-28-10 on CIFAR-10 has 36.5 M parameters (the paper's Table; 36 479 194 counted with
    /// the PyTorch port's modules and 10 classes).
    #[test]
    fn wrn_28_10_has_the_known_parameter_count() {
        let m = WideResNet::new([3, 32, 32], 28, 10, 10, 32, 0.1);
        assert_eq!(m.layout().len(), 36_479_194);
        assert_eq!(m.segments(), 14);
        assert_eq!(m.spatial(12), (8, 8));
        let names: Vec<&str> = m.layout().params.iter().map(|p| p.name.as_str()).collect();
        assert!(names.contains(&"block1.layer.0.convShortcut.weight"));
        assert!(!names.contains(&"block1.layer.1.convShortcut.weight"));
        assert!(names.contains(&"block3.layer.3.conv2.weight"));
        assert_eq!(m.state_layout().params.len(), 2 * (12 * 2 + 1));
    }
}
