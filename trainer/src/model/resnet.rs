//! `model.kind = "resnet18"`: the CIFAR variant of ResNet-18 (He et al. 2016) — a 3×3 stride-1
//! stem conv without max-pool, four stages of two basic blocks (widths w, 2w, 4w, 8w; stages 2-4
//! start with stride 2 and a 1×1 projection shortcut), global average pooling and a linear head —
//! with base width w = `model.width` (64 by default).
//!
//! Tensor names, shapes and order are torchvision's `resnet18` state dict (`conv1.weight`,
//! `bn1.weight`, `bn1.running_mean`, `layer1.0.conv1.weight`, `layer2.0.downsample.0.weight`, …,
//! `fc.weight`, `fc.bias`), so that `model.safetensors` loads with `load_state_dict(strict=True)`
//! into torchvision's resnet18 with `conv1` replaced by a 3×3 stride-1 conv and `maxpool` by
//! `Identity` (`scripts/torchvision_resnet.py` does exactly that and compares predictions).
//! Initialisation is torchvision's: convs He normal (fan_out), batch norm γ = 1, β = 0, the head
//! PyTorch's `nn.Linear` default. Batch norm runs over ghost batches of `model.bn_group` samples in
//! training (`layers::batch_norm_train`), with the running statistics in evaluation.
//!
//! Segments (the unit of activation recomputation): the stem, each of the 8 blocks, the head.

use candle_core::Tensor;

use super::activation::{conv_bn, dense, residual_stack, LayerActivation};
use super::layers::{add_relu, conv2d, global_avg_pool, images, linear};
use super::registry::{bn_defaults, bn_keys, Kind};
use super::{conv_weight, Bn, Model, Pass};
use crate::error::{Error, Result};
use crate::layout::{Init, ParamLayout};

/// torchvision's base width.
pub const DEFAULT_WIDTH: usize = 64;

/// `model.kind = "resnet18"`: `model.width`, `model.bn_group`, `model.bn_momentum`.
pub const KIND: Kind = Kind {
    name: "resnet18",
    about: "CIFAR ResNet-18 (3x3 stem, no max-pool), torchvision's tensor names",
    keys: &["width", "bn_group", "bn_momentum"],
    defaults: |c| {
        c.width.get_or_insert(DEFAULT_WIDTH);
        bn_defaults(c);
    },
    validate: |c| {
        if c.width == Some(0) {
            return Err(Error::config("model.width", "must be at least 1"));
        }
        bn_keys(c).map(|_| ())
    },
    build: |c, image_shape, classes| {
        let (group, momentum) = bn_keys(c)?;
        Ok(Box::new(ResNet18::new(image_shape, c.width.unwrap_or(DEFAULT_WIDTH), classes, group, momentum)))
    },
};

/// A basic block: conv3×3(stride) → BN → ReLU → conv3×3 → BN, plus the shortcut (identity, or
/// conv1×1(stride) → BN when the shape changes), then ReLU.
#[derive(Clone, Debug)]
struct Block {
    conv1: usize,
    bn1: Bn,
    conv2: usize,
    bn2: Bn,
    downsample: Option<(usize, Bn)>,
    stride: usize,
    c_in: usize,
    c_out: usize,
}

#[derive(Clone, Debug)]
pub struct ResNet18 {
    image_shape: [usize; 3],
    width: usize,
    classes: usize,
    bn_group: usize,
    bn_momentum: f64,
    layout: ParamLayout,
    state: ParamLayout,
    conv1: usize,
    bn1: Bn,
    blocks: Vec<Block>,
    fc: usize,
}

impl ResNet18 {
    pub fn new(image_shape: [usize; 3], width: usize, classes: usize, bn_group: usize, bn_momentum: f64) -> Self {
        let (mut layout, mut state) = (ParamLayout::default(), ParamLayout::default());
        let conv1 = conv_weight(&mut layout, "conv1.weight".into(), width, image_shape[0], 3);
        let bn1 = Bn::declare(&mut layout, &mut state, "bn1", width);
        let mut blocks = Vec::new();
        let mut c_in = width;
        for stage in 0..4 {
            let c_out = width << stage;
            for b in 0..2 {
                let stride = if stage > 0 && b == 0 { 2 } else { 1 };
                let p = format!("layer{}.{b}", stage + 1);
                let conv1 = conv_weight(&mut layout, format!("{p}.conv1.weight"), c_out, c_in, 3);
                let bn1 = Bn::declare(&mut layout, &mut state, &format!("{p}.bn1"), c_out);
                let conv2 = conv_weight(&mut layout, format!("{p}.conv2.weight"), c_out, c_out, 3);
                let bn2 = Bn::declare(&mut layout, &mut state, &format!("{p}.bn2"), c_out);
                let downsample = (stride != 1 || c_in != c_out).then(|| {
                    let w = conv_weight(&mut layout, format!("{p}.downsample.0.weight"), c_out, c_in, 1);
                    (w, Bn::declare(&mut layout, &mut state, &format!("{p}.downsample.1"), c_out))
                });
                blocks.push(Block { conv1, bn1, conv2, bn2, downsample, stride, c_in, c_out });
                c_in = c_out;
            }
        }
        let fc = layout.params.len();
        layout.push_init("fc.weight", &[classes, c_in], Init::TorchLinear { fan_in: c_in });
        layout.push_init("fc.bias", &[classes], Init::TorchLinear { fan_in: c_in });
        Self { image_shape, width, classes, bn_group, bn_momentum, layout, state, conv1, bn1, blocks, fc }
    }

    /// Spatial size (H, W) after the first `blocks` blocks.
    #[cfg(test)]
    fn spatial(&self, blocks: usize) -> (usize, usize) {
        super::spatial_after(self.image_shape, self.blocks[..blocks].iter().map(|b| b.stride))
    }
}

impl Model for ResNet18 {
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
            let y = conv2d(&images(h, self.image_shape, "resnet18")?, &params[self.conv1], 1, 1)?;
            return self.bn1.forward_relu(params, &y, g, pass);
        }
        if let Some(b) = self.blocks.get(k - 1) {
            let out = conv2d(h, &params[b.conv1], 1, b.stride)?;
            let out = b.bn1.forward_relu(params, &out, g, pass)?;
            let out = conv2d(&out, &params[b.conv2], 1, 1)?;
            let out = b.bn2.forward(params, &out, g, pass)?;
            let shortcut = match &b.downsample {
                Some((w, bn)) => bn.forward(params, &conv2d(h, &params[*w], 0, b.stride)?, g, pass)?,
                None => h.clone(),
            };
            return add_relu(&out, &shortcut);
        }
        if k == self.blocks.len() + 1 {
            return linear(&global_avg_pool(h)?, &params[self.fc], &params[self.fc + 1]);
        }
        Err(Error::model(format!("the resnet18 has {} segments, not {}", self.segments(), k + 1)))
    }

    fn describe(&self) -> String {
        let [c, h, w] = self.image_shape;
        format!(
            "resnet18 {c}x{h}x{w} width {} (CIFAR stem, ghost batch norm over {}), {} classes, {} params",
            self.width,
            self.bn_group,
            self.classes,
            self.layout.len()
        )
    }

    fn activations(&self, threads: usize) -> Vec<LayerActivation> {
        let [c, h, w] = self.image_shape;
        let hw = h * w;
        let mut out = vec![conv_bn(c, self.width, 3, hw, hw, threads)];
        let blocks = self.blocks.iter().map(|b| (b.c_in, b.c_out, b.stride, b.downsample.is_some()));
        let (stack, hw_out) = residual_stack(self.image_shape, blocks, threads);
        out.extend(stack);
        let last = self.blocks.last().map_or(self.width, |b| b.c_out);
        let mut head = dense(last, self.classes, false, true);
        head.name = format!("avgpool + {}", head.name);
        head.eval += last * hw_out;
        out.push(head);
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::{init_params, Mode};
    use candle_core::{Device, Var};

    /// The whole network's gradient (training mode, ghost batches of 2 in a batch of 4, every
    /// layer kind: strided convs, projection shortcuts, batch norm, pooling, the head) against
    /// central finite differences in f64, on coordinates of every tensor; and evaluation mode
    /// against training mode with the running statistics set to one group's statistics.
    pub(crate) fn check_model_gradient(model: &dyn Model, shape: [usize; 3], batch: usize) {
        let dev = Device::Cpu;
        let theta: Vec<f64> = init_params(model, 3).iter().map(|&v| v as f64).collect();
        let d: usize = shape.iter().product();
        let x = Tensor::from_vec(crate::data::Dataset::random(batch, shape, 3, 5).to_f32(), (batch, d), &dev)
            .unwrap()
            .to_dtype(candle_core::DType::F64)
            .unwrap();
        let labels: Vec<u32> = (0..batch as u32).map(|i| i % 3).collect();
        let onehot = Tensor::from_vec(
            (0..batch * 3).map(|j| if labels[j / 3] as usize == j % 3 { 1.0 } else { 0.0 }).collect::<Vec<f64>>(),
            (batch, 3),
            &dev,
        )
        .unwrap();
        let loss_of = |params: &[Tensor]| -> Tensor {
            let logits = model.forward(params, &x, &mut Pass::train()).unwrap();
            let lse = logits.exp().unwrap().sum_keepdim(1).unwrap().log().unwrap();
            let picked = (&logits * &onehot).unwrap().sum_keepdim(1).unwrap();
            (lse - picked).unwrap().sum_all().unwrap()
        };
        let tensors = |t: &[f64]| -> Vec<Tensor> {
            model
                .layout()
                .params
                .iter()
                .map(|s| Tensor::from_slice(&t[s.range()], s.shape.as_slice(), &dev).unwrap())
                .collect()
        };
        let vars: Vec<Var> = tensors(&theta).into_iter().map(|t| Var::from_tensor(&t).unwrap()).collect();
        let params: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let grads = loss_of(&params).backward().unwrap();
        let mut kinks = 0;
        for (spec, var) in model.layout().params.iter().zip(&vars) {
            let g = grads.get(var).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let gmax = g.iter().fold(1e-9f64, |m, v| m.max(v.abs()));
            for j in [0, spec.numel() / 2, spec.numel() - 1] {
                let i = spec.offset + j;
                let fd_at = |eps: f64| {
                    let mut up = theta.clone();
                    up[i] += eps;
                    let mut down = theta.clone();
                    down[i] -= eps;
                    let l = |t: &[f64]| loss_of(&tensors(t)).to_scalar::<f64>().unwrap();
                    (l(&up) - l(&down)) / (2.0 * eps)
                };
                // ε = 1e-5 and 1e-6: the rounding noise of an f64 loss of this size divided by
                // ε stays ~1e-10, far below the thresholds (at ε = 1e-7 it reached 2e-8, and
                // which coordinates passed depended on the GEMM kernel's summation order).
                let (fd, fine) = (fd_at(1e-5), fd_at(1e-6));
                // A ReLU input crossing zero inside [θ − ε, θ + ε] makes the loss non-smooth
                // there: the two differences then disagree, and the coordinate says nothing.
                if (fd - fine).abs() > 1e-6 * gmax + 1e-8 {
                    kinks += 1;
                    continue;
                }
                assert!(
                    (fd - g[j]).abs() <= 1e-5 * gmax + 1e-7,
                    "{} [{j}]: autograd {:e}, finite difference {fd:e}",
                    spec.name,
                    g[j]
                );
            }
        }
        assert!(kinks <= 2, "{kinks} coordinates at ReLU kinks");
        // Eval mode with running statistics = the statistics of a one-group batch reproduces
        // training mode on that batch (the same normalisation up to the unbiased variance's
        // n/(n−1) and ε): checked through the recorded statistics.
        let mut stats = crate::model::BatchStats { sums: vec![0.0; model.state_layout().len()], groups: 0 };
        let mut pass = Pass { mode: Mode::Train, state: &[], stats: Some(&mut stats) };
        model.forward(&params, &x, &mut pass).unwrap();
        assert!(stats.sums.iter().any(|&v| v != 0.0));
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let m = ResNet18::new([2, 6, 6], 2, 3, 2, 0.1);
        check_model_gradient(&m, [2, 6, 6], 4);
    }

    /// torchvision's resnet18 has 11 689 512 parameters with 1000 classes and a 7×7 stem on 3
    /// channels; the CIFAR stem (3×3: 64·3·9 = 1 728 instead of 9 408) and 10 classes (fc 5 130
    /// instead of 513 000) give 11 173 962, the number every CIFAR ResNet-18 reports.
    #[test]
    fn cifar_resnet18_has_the_known_parameter_count_and_names() {
        let m = ResNet18::new([3, 32, 32], 64, 10, 32, 0.1);
        assert_eq!(m.layout().len(), 11_173_962);
        let names: Vec<&str> = m.layout().params.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(&names[..3], ["conv1.weight", "bn1.weight", "bn1.bias"]);
        assert!(names.contains(&"layer2.0.downsample.0.weight"));
        assert!(names.contains(&"layer4.1.bn2.bias"));
        assert!(!names.contains(&"layer1.0.downsample.0.weight"));
        assert_eq!(&names[names.len() - 2..], ["fc.weight", "fc.bias"]);
        // 20 batch norms, two state tensors each.
        assert_eq!(m.state_layout().params.len(), 40);
        assert_eq!(m.state_layout().params[0].name, "bn1.running_mean");
        assert_eq!(m.layout().get("layer3.0.conv1.weight").unwrap().shape, [256, 128, 3, 3]);
        assert_eq!(m.spatial(8), (4, 4));
        assert_eq!(m.segments(), 10);
    }
}
