//! `model.kind = "vit"`: the Vision Transformer (Dosovitskiy et al. 2021) as timm's
//! `VisionTransformer` builds it with its defaults (`class_token=True`, `global_pool="token"`,
//! `qkv_bias=True`, no pre-norm, no layer scale, no register tokens):
//!
//! 1. patch embedding: a conv with kernel = stride = `model.patch` (here the patches are cut out
//!    and multiplied by the kernel as one matrix: the same sums), giving N = (H/p)·(W/p) tokens;
//! 2. the class token in front, then the learned position embedding added (N + 1 positions);
//! 3. `model.depth` pre-norm encoder blocks: x + attn(LN(x)), then x + mlp(LN(x)), the
//!    attention with `model.heads` heads, qkv bias and scale 1/√head_dim, the MLP
//!    dim → ⌊dim·mlp_ratio⌋ → dim with the exact-erf GELU;
//! 3. the final LayerNorm (ε 1e-6 everywhere, timm's), and the linear head on the class token.
//!
//! Tensor names, shapes and order are timm's state dict (`cls_token`, `pos_embed`,
//! `patch_embed.proj.weight`, `blocks.0.norm1.weight`, `blocks.0.attn.qkv.weight`,
//! `blocks.0.attn.proj.weight`, `blocks.0.mlp.fc1.weight`, …, `norm.weight`, `head.weight`), so
//! `model.safetensors` loads with `load_state_dict(strict=True)` into `VisionTransformer` built
//! with the same hyper-parameters (`scripts/timm_vit.py` checks it and compares the logits).
//! Initialisation is timm's default (`init_weights(mode="")`): linear weights normal with std
//! 0.02 (timm's `trunc_normal_` truncates at ±2 absolute, i.e. never at this std), biases 0,
//! LayerNorm γ = 1 and β = 0, the position embedding normal(0.02), the class token
//! normal(1e-6), and the patch embedding's conv PyTorch's default (U(±1/√fan_in) for weight and
//! bias).
//!
//! Segments (the unit of activation recomputation): the embedding, each encoder block, the head.

use candle_core::Tensor;

use super::activation::LayerActivation;
use super::registry::{Kind, ModelConfig};
use super::transformer::{gelu, layer_norm, self_attention, token_linear, LN_EPS};
use super::{Model, Pass};
use crate::error::{Error, Result};
use crate::layout::{Init, ParamLayout};

/// The presets `model.preset` names: (name, patch, dim, depth, heads, mlp_ratio), timm's
/// `vit_tiny_patch16_224`, `vit_small_patch16_224` and `vit_base_patch16_224`.
pub const PRESETS: [(&str, usize, usize, usize, usize, f64); 3] =
    [("vit-ti16", 16, 192, 12, 3, 4.0), ("vit-s16", 16, 384, 12, 6, 4.0), ("vit-b16", 16, 768, 12, 12, 4.0)];

/// Without a preset the keys default to ViT-Ti/16's.
const DEFAULT_PRESET: &str = "vit-ti16";

fn preset(name: &str) -> Result<(usize, usize, usize, usize, f64)> {
    PRESETS.iter().find(|p| p.0 == name).map(|&(_, p, d, l, h, r)| (p, d, l, h, r)).ok_or_else(|| {
        let names: Vec<String> = PRESETS.iter().map(|p| format!("{:?}", p.0)).collect();
        Error::config("model.preset", format!("unknown preset {name:?}; expected one of {}", names.join(", ")))
    })
}

/// `model.kind = "vit"`: `model.preset`, `model.patch`, `model.dim`, `model.depth`,
/// `model.heads`, `model.mlp_ratio`.
pub const KIND: Kind = Kind {
    name: "vit",
    about: "Vision Transformer (timm's VisionTransformer: class token, pre-norm blocks; ViT-Ti/16 by default)",
    keys: &["preset", "patch", "dim", "depth", "heads", "mlp_ratio"],
    defaults: |c| {
        // An unknown preset is left for `validate` to name.
        let (p, d, l, h, r) =
            preset(c.preset.as_deref().unwrap_or(DEFAULT_PRESET)).unwrap_or_else(|_| preset(DEFAULT_PRESET).unwrap());
        c.patch.get_or_insert(p);
        c.dim.get_or_insert(d);
        c.depth.get_or_insert(l);
        c.heads.get_or_insert(h);
        c.mlp_ratio.get_or_insert(r);
    },
    validate: |c| {
        if let Some(name) = &c.preset {
            preset(name)?;
        }
        let h = hyper(c)?;
        if h.patch == 0 {
            return Err(Error::config("model.patch", "must be at least 1"));
        }
        if h.dim == 0 {
            return Err(Error::config("model.dim", "must be at least 1"));
        }
        if h.depth == 0 {
            return Err(Error::config("model.depth", "must be at least 1"));
        }
        if h.heads == 0 || h.dim % h.heads != 0 {
            return Err(Error::config(
                "model.heads",
                format!("must divide model.dim = {} (each head gets dim / heads features), got {}", h.dim, h.heads),
            ));
        }
        if h.hidden == 0 {
            return Err(Error::config(
                "model.mlp_ratio",
                format!("must be positive with ⌊dim·mlp_ratio⌋ ≥ 1, got {:?}", c.mlp_ratio),
            ));
        }
        Ok(())
    },
    build: |c, image_shape, classes| Ok(Box::new(Vit::new(image_shape, hyper(c)?, classes)?)),
};

/// The hyper-parameters of a ViT.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct VitHyper {
    pub patch: usize,
    pub dim: usize,
    pub depth: usize,
    pub heads: usize,
    /// The MLP's hidden width, ⌊dim·mlp_ratio⌋ (timm's `int(dim * mlp_ratio)`).
    pub hidden: usize,
}

fn hyper(c: &ModelConfig) -> Result<VitHyper> {
    let missing = |key: &str| Error::config(format!("model.{key}"), "has no value (the defaults were not filled in)");
    let dim = c.dim.ok_or_else(|| missing("dim"))?;
    let ratio = c.mlp_ratio.ok_or_else(|| missing("mlp_ratio"))?;
    if !(ratio.is_finite() && ratio > 0.0) {
        return Err(Error::config("model.mlp_ratio", format!("must be a positive number, got {ratio}")));
    }
    Ok(VitHyper {
        patch: c.patch.ok_or_else(|| missing("patch"))?,
        dim,
        depth: c.depth.ok_or_else(|| missing("depth"))?,
        heads: c.heads.ok_or_else(|| missing("heads"))?,
        hidden: (dim as f64 * ratio) as usize,
    })
}

/// The indices of one encoder block's tensors in the layout (each weight is followed by its
/// bias).
#[derive(Clone, Debug)]
struct Block {
    norm1: usize,
    qkv: usize,
    proj: usize,
    norm2: usize,
    fc1: usize,
    fc2: usize,
}

#[derive(Clone, Debug)]
pub struct Vit {
    image_shape: [usize; 3],
    hyper: VitHyper,
    classes: usize,
    /// Patches per image, (H/p)·(W/p).
    patches: usize,
    layout: ParamLayout,
    cls: usize,
    pos: usize,
    embed: usize,
    blocks: Vec<Block>,
    norm: usize,
    head: usize,
}

impl Vit {
    /// The ViT for images of shape (C, H, W); H and W must be multiples of the patch size.
    pub fn new(image_shape: [usize; 3], hyper: VitHyper, classes: usize) -> Result<Self> {
        let [c, h, w] = image_shape;
        let VitHyper { patch: p, dim, depth, heads: _, hidden } = hyper;
        if p == 0 || h % p != 0 || w % p != 0 {
            return Err(Error::config(
                "model.patch",
                format!("{p} does not divide the images' {h}×{w} pixels (set data.image_size or model.patch)"),
            ));
        }
        let patches = (h / p) * (w / p);
        let mut layout = ParamLayout::default();
        let mut push = |name: String, shape: &[usize], init: Init| {
            layout.push_init(name, shape, init);
            layout.params.len() - 1
        };
        let timm_linear = Init::Normal { std: 0.02 };
        let cls = push("cls_token".into(), &[1, 1, dim], Init::Normal { std: 1e-6 });
        let pos = push("pos_embed".into(), &[1, patches + 1, dim], Init::Normal { std: 0.02 });
        let fan_in = c * p * p;
        let embed = push("patch_embed.proj.weight".into(), &[dim, c, p, p], Init::TorchLinear { fan_in });
        push("patch_embed.proj.bias".into(), &[dim], Init::TorchLinear { fan_in });
        let norm = |push: &mut dyn FnMut(String, &[usize], Init) -> usize, name: String| {
            let i = push(format!("{name}.weight"), &[dim], Init::Ones);
            push(format!("{name}.bias"), &[dim], Init::Zeros);
            i
        };
        let linear = |push: &mut dyn FnMut(String, &[usize], Init) -> usize, name: String, out: usize, inp: usize| {
            let i = push(format!("{name}.weight"), &[out, inp], timm_linear);
            push(format!("{name}.bias"), &[out], Init::Zeros);
            i
        };
        let blocks = (0..depth)
            .map(|i| {
                let b = format!("blocks.{i}");
                Block {
                    norm1: norm(&mut push, format!("{b}.norm1")),
                    qkv: linear(&mut push, format!("{b}.attn.qkv"), 3 * dim, dim),
                    proj: linear(&mut push, format!("{b}.attn.proj"), dim, dim),
                    norm2: norm(&mut push, format!("{b}.norm2")),
                    fc1: linear(&mut push, format!("{b}.mlp.fc1"), hidden, dim),
                    fc2: linear(&mut push, format!("{b}.mlp.fc2"), dim, hidden),
                }
            })
            .collect();
        let norm = norm(&mut push, "norm".into());
        let head = linear(&mut push, "head".into(), classes, dim);
        Ok(Self { image_shape, hyper, classes, patches, layout, cls, pos, embed, blocks, norm, head })
    }

    /// Tokens [B, N + 1, D] from images [B, C·H·W]: patches × kernel + bias, the class token in
    /// front, plus the position embedding.
    fn embed(&self, params: &[Tensor], x: &Tensor) -> Result<Tensor> {
        let [c, h, w] = self.image_shape;
        let (p, dim) = (self.hyper.patch, self.hyper.dim);
        let b = x.dim(0)?;
        if x.dims() != [b, c * h * w] {
            return Err(Error::model(format!(
                "the vit takes images of {c}×{h}×{w} = {} values, got {:?}",
                c * h * w,
                x.dims()
            )));
        }
        // [B, C, H/p, p, W/p, p] → [B, H/p, W/p, C, p, p]: one row per patch, in the conv
        // kernel's (c, i, j) order, patches row-major as the conv output is flattened.
        let cols = x.reshape((b, c, h / p, p, w / p, p))?.permute((0, 2, 4, 1, 3, 5))?.contiguous()?.reshape((
            b,
            self.patches,
            c * p * p,
        ))?;
        let weight = params[self.embed].reshape((dim, c * p * p))?;
        let tokens = token_linear(&cols, &weight, &params[self.embed + 1])?; // [B, N, D]
        let cls = params[self.cls].broadcast_as((b, 1, dim))?;
        Ok(Tensor::cat(&[&cls, &tokens], 1)?.broadcast_add(&params[self.pos])?)
    }

    fn block(&self, params: &[Tensor], blk: &Block, x: &Tensor) -> Result<Tensor> {
        let ln = |i: usize, x: &Tensor| layer_norm(x, &params[i], &params[i + 1], LN_EPS);
        let a = ln(blk.norm1, x)?;
        let a = self_attention(
            &a,
            &params[blk.qkv],
            &params[blk.qkv + 1],
            &params[blk.proj],
            &params[blk.proj + 1],
            self.hyper.heads,
        )?;
        let x = (x + a)?;
        let m = token_linear(&ln(blk.norm2, &x)?, &params[blk.fc1], &params[blk.fc1 + 1])?;
        let m = token_linear(&gelu(&m)?, &params[blk.fc2], &params[blk.fc2 + 1])?;
        Ok((x + m)?)
    }

    fn head(&self, params: &[Tensor], x: &Tensor) -> Result<Tensor> {
        let x = layer_norm(x, &params[self.norm], &params[self.norm + 1], LN_EPS)?;
        let cls = x.narrow(1, 0, 1)?.squeeze(1)?; // [B, D]
        token_linear(&cls, &params[self.head], &params[self.head + 1])
    }
}

impl Model for Vit {
    fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    /// The embedding, each block, the head.
    fn segments(&self) -> usize {
        self.blocks.len() + 2
    }

    fn forward_segment(&self, params: &[Tensor], k: usize, h: &Tensor, _: &mut Pass) -> Result<Tensor> {
        if params.len() != self.layout.params.len() {
            return Err(Error::model(format!(
                "the vit takes {} tensors, got {}",
                self.layout.params.len(),
                params.len()
            )));
        }
        let last = self.blocks.len() + 1;
        match k {
            0 => self.embed(params, h),
            k if k < last => self.block(params, &self.blocks[k - 1], h),
            k if k == last => self.head(params, h),
            _ => Err(Error::model(format!("the vit has {} segments, not {}", last + 1, k + 1))),
        }
    }

    fn describe(&self) -> String {
        let [c, h, w] = self.image_shape;
        let VitHyper { patch, dim, depth, heads, hidden } = self.hyper;
        format!(
            "vit {c}x{h}x{w} patch {patch} dim {dim} depth {depth} heads {heads} mlp {hidden}, {} tokens, {} classes, {} params",
            self.patches + 1,
            self.classes,
            self.layout.len()
        )
    }

    /// Values per sample, for T = N + 1 tokens of D features, H heads and an MLP of M: the
    /// embedding keeps the patch matrix and the tokens; a block keeps, through the backward
    /// pass, its two LayerNorms' inputs and outputs (4·T·D), q, k, v and their scaled and
    /// contiguous copies (~6·T·D), the attention scores and probabilities (2·H·T²), the heads'
    /// output and its projection (3·T·D), the residual sums (2·T·D) and the MLP's hidden values
    /// before and after the GELU (2·T·M); its transient peak is the backward pass of the
    /// attention (the score gradients, 2·H·T², and q, k, v's, 3·T·D).
    fn activations(&self, _threads: usize) -> Vec<LayerActivation> {
        let [c, h, w] = self.image_shape;
        let VitHyper { dim, heads, hidden, .. } = self.hyper;
        let t = self.patches + 1;
        let (td, tt) = (t * dim, heads * t * t);
        let mut out = vec![LayerActivation {
            name: format!("patch embedding {}→{dim} ×{t}", c * self.hyper.patch * self.hyper.patch),
            output: td,
            kept: c * h * w + 3 * td,
            transient: 2 * td,
            eval: c * h * w + 2 * td,
        }];
        for i in 0..self.blocks.len() {
            out.push(LayerActivation {
                name: format!("block {i} attention {heads}×{t}² + mlp {dim}→{hidden}"),
                output: td,
                kept: 15 * td + 2 * tt + 2 * t * hidden,
                transient: 2 * tt + 3 * td,
                eval: 5 * td + 2 * tt + 2 * t * hidden,
            });
        }
        out.push(LayerActivation {
            name: format!("norm + head {dim}→{}", self.classes),
            output: self.classes,
            kept: 2 * td + 6 * self.classes,
            transient: 2 * td,
            eval: 2 * td,
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use crate::config::model_config;

    #[test]
    fn presets_and_names_follow_timm() {
        let m =
            super::super::build(&model_config("vit", &["preset=\"vit-s16\""]).unwrap(), [3, 224, 224], 1000).unwrap();
        // timm's vit_small_patch16_224: 22 050 664 parameters.
        assert_eq!(m.layout().len(), 22_050_664, "{}", m.describe());
        let names: Vec<&str> = m.layout().params.iter().map(|p| p.name.as_str()).take(8).collect();
        assert_eq!(
            names,
            [
                "cls_token",
                "pos_embed",
                "patch_embed.proj.weight",
                "patch_embed.proj.bias",
                "blocks.0.norm1.weight",
                "blocks.0.norm1.bias",
                "blocks.0.attn.qkv.weight",
                "blocks.0.attn.qkv.bias"
            ]
        );
        assert_eq!(m.layout().get("pos_embed").unwrap().shape, [1, 197, 384]);
        assert_eq!(m.layout().get("blocks.11.mlp.fc1.weight").unwrap().shape, [1536, 384]);
        assert_eq!(m.layout().get("head.weight").unwrap().shape, [1000, 384]);
        let b =
            super::super::build(&model_config("vit", &["preset=\"vit-b16\""]).unwrap(), [3, 224, 224], 1000).unwrap();
        assert_eq!(b.layout().len(), 86_567_656, "{}", b.describe()); // timm's vit_base_patch16_224
        let t = super::super::build(&model_config("vit", &[]).unwrap(), [3, 224, 224], 1000).unwrap();
        assert_eq!(t.layout().len(), 5_717_416, "{}", t.describe()); // vit_tiny_patch16_224
    }

    #[test]
    fn keys_are_checked() {
        let err = |sets: &[&str], img: [usize; 3]| match model_config("vit", sets) {
            Err(e) => e.to_string(),
            Ok(c) => super::super::build(&c, img, 10).err().map(|e| e.to_string()).unwrap_or_default(),
        };
        let e = err(&["preset=\"vit-h14\""], [3, 224, 224]);
        assert!(e.contains("model.preset") && e.contains("vit-s16"), "{e}");
        let e = err(&["dim=100", "heads=3"], [3, 224, 224]);
        assert!(e.contains("model.heads"), "{e}");
        let e = err(&["patch=5"], [1, 28, 28]);
        assert!(e.contains("model.patch") && e.contains("28"), "{e}");
        let e = err(&["mlp_ratio=0.0"], [3, 32, 32]);
        assert!(e.contains("model.mlp_ratio"), "{e}");
        // A preset's values can be overridden.
        let c = model_config("vit", &["preset=\"vit-s16\"", "depth=2", "patch=4"]).unwrap();
        assert_eq!((c.dim, c.depth, c.patch, c.heads), (Some(384), Some(2), Some(4), Some(6)));
    }
}
