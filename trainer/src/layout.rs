//! `ParamLayout`: where each named model tensor lives inside the one flat parameter buffer.
//! θ, every stage gradient, the AdaGrad accumulator G and momentum m share this layout, so the
//! optimizer arithmetic is one pass over flat slices and never sees tensor boundaries.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ParamSpec {
    /// Stable, documented name, e.g. `layers.0.weight` (shape [out, in], as PyTorch's nn.Linear).
    pub name: String,
    pub shape: Vec<usize>,
    /// Offset of the first element in the flat buffer.
    pub offset: usize,
    /// How fresh values are drawn (`model::init_params`).
    #[serde(default)]
    pub init: Init,
}

/// How a tensor's fresh values are drawn. Shapes are [out, in, ...] (PyTorch's layout), so
/// fan_in = Π shape[1..] and fan_out = shape[0] · Π shape[2..].
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Init {
    /// All zeros (biases, batch-norm shifts, running means).
    #[default]
    Zeros,
    /// All ones (batch-norm scales, running variances).
    Ones,
    /// flax's default `lecun_normal`: a normal truncated at ±2σ and rescaled so that the variance
    /// is exactly 1/fan_in.
    LecunNormal,
    /// He (Kaiming) normal with variance 2/fan_out, untruncated: torchvision's ResNet convs
    /// (`kaiming_normal_(mode="fan_out", nonlinearity="relu")`).
    HeNormalFanOut,
    /// A normal truncated at ±2σ and rescaled to standard deviation `std` (timm's `trunc_normal_`
    /// convention for transformers).
    TruncatedNormal { std: f64 },
    /// A normal with standard deviation `std`, untruncated: timm's Vision Transformer
    /// (`trunc_normal_(std=.02)` truncates at ±2 in absolute value, ±100σ: never), and its class
    /// token (`normal_(std=1e-6)`).
    Normal { std: f64 },
    /// PyTorch's `nn.Linear` default for weight and bias: U(−1/√fan_in, 1/√fan_in) with the
    /// layer's fan_in (the weight's, also for its bias).
    TorchLinear { fan_in: usize },
}

impl ParamSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.numel()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ParamLayout {
    pub params: Vec<ParamSpec>,
}

impl ParamLayout {
    /// Append a tensor after the existing ones (contiguous, row-major), initialised as the paper's
    /// flax models are: LeCun normal for weights (rank ≥ 2), zeros for biases.
    pub fn push(&mut self, name: impl Into<String>, shape: &[usize]) {
        let init = if shape.len() >= 2 { Init::LecunNormal } else { Init::Zeros };
        self.push_init(name, shape, init);
    }
    /// Append a tensor with an explicit initialiser.
    pub fn push_init(&mut self, name: impl Into<String>, shape: &[usize], init: Init) {
        let offset = self.len();
        self.params.push(ParamSpec { name: name.into(), shape: shape.to_vec(), offset, init });
    }
    /// Total number of parameters P.
    pub fn len(&self) -> usize {
        self.params.last().map(|p| p.offset + p.numel()).unwrap_or(0)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn get(&self, name: &str) -> Option<&ParamSpec> {
        self.params.iter().find(|p| p.name == name)
    }
}

/// Test helper: `layout` holds exactly the tensors `expect` (name, shape), in order, packed
/// back to back from offset 0.
#[cfg(test)]
pub(crate) fn assert_contiguous(layout: &ParamLayout, expect: &[(&str, &[usize])]) {
    assert_eq!(layout.params.len(), expect.len());
    let mut offset = 0;
    for (spec, (name, shape)) in layout.params.iter().zip(expect) {
        assert_eq!(spec.name, *name);
        assert_eq!(spec.shape, *shape);
        assert_eq!(spec.offset, offset);
        offset += spec.numel();
    }
}
