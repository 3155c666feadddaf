//! Activation memory per sample of the layer types the models are built from, in f32 values:
//! each model lists one `LayerActivation` per segment (`Model::activations`) and the memory
//! planner (`planner`) adds them up. The factors and their calibration against measured peak RSS
//! are explained in `planner`'s module doc.

use serde::Serialize;

// Per-layer factors (see `planner`'s module doc).
const DENSE_KEPT: usize = 3;
const DENSE_TRANSIENT: usize = 6;
const INPUT_GRAD: usize = 2;
const HEAD_KEPT: usize = 6;
const CONV_KEPT: usize = 4;
const CONV_TRANSIENT: usize = 7;
const CONV_INPUT: usize = 3;
/// Training-mode batch norm over ghost batches keeps, per output value, the centred input, its
/// square, the normalised value, its product with γ and the sum with β (`layers::batch_norm_train`);
/// a ReLU after it keeps one more, a residual sum one more.
const BN_KEPT: usize = 5;

/// One layer's (or one segment's) activation memory, in f32 values per sample.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LayerActivation {
    /// e.g. "dense 784→500 +ReLU".
    pub name: String,
    /// Values at the layer's output: what recomputation keeps as the checkpoint.
    pub output: usize,
    /// Values autograd keeps from the forward pass until this layer is back-propagated.
    pub kept: usize,
    /// Peak temporaries while this layer runs (forward or backward).
    pub transient: usize,
    /// Working set of the forward pass without autograd (evaluation).
    pub eval: usize,
}

impl LayerActivation {
    /// Several layers run as one segment (a residual block): the last one's output, every
    /// layer's kept values, the largest transient and evaluation working set.
    pub fn chain(name: impl Into<String>, layers: &[LayerActivation]) -> LayerActivation {
        LayerActivation {
            name: name.into(),
            output: layers.last().map_or(0, |l| l.output),
            kept: layers.iter().map(|l| l.kept).sum(),
            transient: layers.iter().map(|l| l.transient).max().unwrap_or(0),
            eval: layers.iter().map(|l| l.eval).max().unwrap_or(0),
        }
    }
}

/// Dense layer `n_in → out`: `first` = it reads the images (no input gradient), `logits` = the
/// last layer, feeding the cross-entropy instead of a ReLU.
pub fn dense(n_in: usize, out: usize, first: bool, logits: bool) -> LayerActivation {
    let kept = if logits { HEAD_KEPT * out } else { DENSE_KEPT * out } + if first { out } else { 0 };
    let input_grad = if first { 0 } else { INPUT_GRAD * n_in };
    LayerActivation {
        name: format!("dense {n_in}→{out} {}", if logits { "+cross-entropy" } else { "+ReLU" }),
        output: out,
        kept,
        transient: DENSE_TRANSIENT * out + input_grad,
        eval: 3 * out + if first { 0 } else { n_in },
    }
}

/// Dense layer `n_in → out` on the MLP's own gradient path (`model::native`, the CPU's): it
/// keeps only its output (after the ReLU; the logits for the last layer) and while it is
/// back-propagated holds the gradient at its output and, except for the first layer, the one it
/// passes down (the `Workspace`'s two buffers). Measured: 12.3 KiB/sample for the default MLP
/// between batch 1024 and 8192, predicted 12.9 (see `planner`).
pub fn native_dense(n_in: usize, out: usize, first: bool, logits: bool) -> LayerActivation {
    LayerActivation {
        name: format!("dense {n_in}→{out} {} (native)", if logits { "+cross-entropy" } else { "+ReLU" }),
        output: out,
        kept: out,
        transient: out + if first { 0 } else { n_in },
        eval: 3 * out + if first { 0 } else { n_in },
    }
}

/// conv k×k `c_in → c_out` from `hw_in` to `hw_out` pixels (stride² = hw_in / hw_out), + bias +
/// ReLU (the paper's CNN; calibrated for k = 3, stride 1).
pub fn conv(c_in: usize, c_out: usize, k: usize, hw_in: usize, hw_out: usize, threads: usize) -> LayerActivation {
    let (i, o) = (c_in * hw_in, c_out * hw_out);
    let tiles = threads.clamp(1, c_in.max(1));
    LayerActivation {
        name: format!("conv{k}x{k} {c_in}→{c_out} +ReLU"),
        output: o,
        kept: CONV_KEPT * o,
        transient: CONV_TRANSIENT * o + CONV_INPUT * i + tiles * k * k * hw_in,
        eval: 3 * o + 2 * i,
    }
}

/// conv k×k (no bias) + training-mode batch norm (+ ReLU): the ResNets' unit: the conv's factors
/// plus batch norm's kept values (checked against measured RSS in `planner`'s module doc).
pub fn conv_bn(c_in: usize, c_out: usize, k: usize, hw_in: usize, hw_out: usize, threads: usize) -> LayerActivation {
    let mut l = conv(c_in, c_out, k, hw_in, hw_out, threads);
    l.name = format!("conv{k}x{k} {c_in}→{c_out} +BN+ReLU");
    l.kept += BN_KEPT * l.output;
    l.eval += l.output;
    l
}

/// A residual block (`index` from 1) of two 3×3 conv + batch norm units, `c_in → c_out` from
/// `hw_in` to `hw_out` pixels, with a 1×1 projection shortcut when `projection`, as one segment.
pub fn residual_block(
    index: usize,
    c_in: usize,
    c_out: usize,
    hw_in: usize,
    hw_out: usize,
    projection: bool,
    threads: usize,
) -> LayerActivation {
    let mut parts =
        vec![conv_bn(c_in, c_out, 3, hw_in, hw_out, threads), conv_bn(c_out, c_out, 3, hw_out, hw_out, threads)];
    if projection {
        parts.push(conv_bn(c_in, c_out, 1, hw_in, hw_out, threads));
    }
    LayerActivation::chain(format!("block {index} {c_in}→{c_out}"), &parts)
}

/// A stack of residual blocks from images of `image_shape`, one `residual_block` segment each:
/// `(c_in, c_out, stride, projection)` per block. Returns the entries and the pixels after the
/// last block (what the head's pooling reads).
pub fn residual_stack(
    image_shape: [usize; 3],
    blocks: impl IntoIterator<Item = (usize, usize, usize, bool)>,
    threads: usize,
) -> (Vec<LayerActivation>, usize) {
    let [c, mut h, mut w] = image_shape;
    let mut out = Vec::new();
    for (i, (c_in, c_out, stride, projection)) in blocks.into_iter().enumerate() {
        let (ho, wo) = super::spatial_after([c, h, w], std::iter::once(stride));
        out.push(residual_block(i + 1, c_in, c_out, h * w, ho * wo, projection, threads));
        (h, w) = (ho, wo);
    }
    (out, h * w)
}
