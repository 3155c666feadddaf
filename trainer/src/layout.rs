//! `ParamLayout`: where each named model tensor lives inside the one flat parameter buffer.
//! θ, every stage gradient, the AdaGrad accumulator G and momentum m share this layout, so the
//! optimizer arithmetic is one pass over flat slices and never sees tensor boundaries.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamSpec {
    /// Stable, documented name, e.g. `layers.0.weight` (shape [out, in], as PyTorch's nn.Linear).
    pub name: String,
    pub shape: Vec<usize>,
    /// Offset of the first element in the flat buffer.
    pub offset: usize,
}

impl ParamSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.numel()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamLayout {
    pub params: Vec<ParamSpec>,
}

impl ParamLayout {
    /// Append a tensor after the existing ones (contiguous, row-major).
    pub fn push(&mut self, name: impl Into<String>, shape: &[usize]) {
        let offset = self.len();
        self.params.push(ParamSpec { name: name.into(), shape: shape.to_vec(), offset });
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
