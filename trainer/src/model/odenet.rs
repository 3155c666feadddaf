//! `model.kind = "odenet"`: an image classifier whose middle is one neural-ODE block (ODE-Net,
//! Chen et al. 2018, "Neural Ordinary Differential Equations", §7.1; here without its group
//! norms, so that every sample is its own computation and the trajectory does not depend on the
//! number of ranks or micro-batches):
//!
//! 1. stem: conv 3×3 stride 2 (C → width) + ReLU, conv 3×3 stride 2 (width → width) + ReLU
//!    (28×28 → 14×14 → 7×7);
//! 2. the ODE block (`model.ode`, `model::ode`): y(T) of dy/dt = f_θ(t, y), y(0) = the stem's
//!    output, with f_θ(t, y) = conv₂([t, tanh(conv₁([t, y]) + b₁)]) + b₂, both convs 3×3 "same"
//!    width + 1 → width, where [t, ·] puts a constant channel holding the time in front (ODE-Net's
//!    `ConcatConv2d`); tanh keeps f smooth and Lipschitz (the solvers' order and the gradient
//!    checks need it);
//! 3. head: global average pool, linear width → classes.
//!
//! Tensors follow PyTorch's names and shapes (`stem.0.weight` [width, C, 3, 3], `stem.0.bias`,
//! `stem.1.*`, `ode.conv1.weight` [width, width + 1, 3, 3], `ode.conv1.bias`, `ode.conv2.*`,
//! `head.weight` [classes, width], `head.bias`), every one initialised as PyTorch's `nn.Conv2d`
//! and `nn.Linear` do (U(±1/√fan_in) for weights and biases).
//!
//! Segments (the unit of activation recomputation): the stem, the ODE block, the head.

use std::sync::Arc;

use candle_core::Tensor;

use super::activation::{conv, dense, LayerActivation};
use super::layers::{conv2d, global_avg_pool, images, linear};
use super::ode::{widen, Dynamics, Method, OdeBlock, Solver};
use super::registry::{Kind, ModelConfig};
use super::{spatial_after, Model, Pass};
use crate::error::{Error, Result};
use crate::layout::{Init, ParamLayout};

/// The channels of the stem and the ODE block by default.
pub const DEFAULT_WIDTH: usize = 32;

/// `model.kind = "odenet"`: `model.width` and the `[model.ode]` table.
pub const KIND: Kind = Kind {
    name: "odenet",
    about: "ODE-Net: strided conv stem, one neural-ODE block of convs (model.ode: tableau, steps, gradient), pooled linear head",
    keys: &["width", "ode"],
    defaults: |c| {
        c.width.get_or_insert(DEFAULT_WIDTH);
        c.ode.get_or_insert_with(Default::default).fill_defaults();
    },
    validate: |c| {
        if c.width == Some(0) {
            return Err(Error::config("model.width", "must be at least 1"));
        }
        solver(c).map(|_| ())
    },
    build: |c, image_shape, classes| {
        Ok(Box::new(OdeNet::new(image_shape, c.width.unwrap_or(DEFAULT_WIDTH), solver(c)?, classes)))
    },
};

fn solver(c: &ModelConfig) -> Result<Solver> {
    c.ode.clone().unwrap_or_default().solver()
}

/// f_θ(t, y) = conv₂([t, tanh(conv₁([t, y]) + b₁)]) + b₂ on states [B, width, H, W]; parameters
/// (conv₁ weight, bias, conv₂ weight, bias).
#[derive(Clone, Debug)]
pub struct ConcatConvField {
    pub width: usize,
}

impl ConcatConvField {
    fn concat_conv(&self, t: &Tensor, y: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
        let input = Tensor::cat(&[t, y], 1)?;
        Ok(conv2d(&input, w, 1, 1)?.broadcast_add(&b.reshape((1, self.width, 1, 1))?)?)
    }
}

impl Dynamics for ConcatConvField {
    fn eval(&self, params: &[Tensor], t: f64, y: &Tensor) -> Result<Tensor> {
        let [w1, b1, w2, b2] = params else {
            return Err(Error::model(format!("the ODE block's field takes 4 tensors, got {}", params.len())));
        };
        let (b, _, h, w) = y.dims4()?;
        let time = Tensor::ones((b, 1, h, w), y.dtype(), y.device())?.affine(t, 0.0)?;
        let u = self.concat_conv(&time, y, w1, b1)?.tanh()?;
        self.concat_conv(&time, &u, w2, b2)
    }
}

#[derive(Clone, Debug)]
pub struct OdeNet {
    image_shape: [usize; 3],
    width: usize,
    classes: usize,
    layout: ParamLayout,
    block: OdeBlock,
    /// The layout index of ode.conv1.weight (the field's 4 tensors follow in order).
    field: usize,
}

impl OdeNet {
    pub fn new(image_shape: [usize; 3], width: usize, solver: Solver, classes: usize) -> Self {
        let c = image_shape[0];
        let mut layout = ParamLayout::default();
        let conv = |layout: &mut ParamLayout, name: &str, c_out: usize, c_in: usize| {
            let init = Init::TorchLinear { fan_in: c_in * 9 };
            layout.push_init(format!("{name}.weight"), &[c_out, c_in, 3, 3], init);
            layout.push_init(format!("{name}.bias"), &[c_out], init);
        };
        conv(&mut layout, "stem.0", width, c);
        conv(&mut layout, "stem.1", width, width);
        let field = layout.params.len();
        conv(&mut layout, "ode.conv1", width, width + 1);
        conv(&mut layout, "ode.conv2", width, width + 1);
        let head = Init::TorchLinear { fan_in: width };
        layout.push_init("head.weight", &[classes, width], head);
        layout.push_init("head.bias", &[classes], head);
        let block = OdeBlock::new(solver, Arc::new(ConcatConvField { width }));
        Self { image_shape, width, classes, layout, block, field }
    }

    pub fn block(&self) -> &OdeBlock {
        &self.block
    }

    /// The ODE block's state (H, W) per channel: the image after two stride-2 convs.
    fn state_hw(&self) -> (usize, usize) {
        spatial_after(self.image_shape, [2, 2].into_iter())
    }
}

impl Model for OdeNet {
    fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    fn segments(&self) -> usize {
        3
    }

    fn forward_segment(&self, params: &[Tensor], k: usize, h: &Tensor, _: &mut Pass) -> Result<Tensor> {
        let bias = |i: usize| params[i].reshape((1, self.width, 1, 1));
        match k {
            0 => {
                let x = images(h, self.image_shape, "odenet")?;
                let s = conv2d(&x, &params[0], 1, 2)?.broadcast_add(&bias(1)?)?.relu()?;
                Ok(conv2d(&s, &params[2], 1, 2)?.broadcast_add(&bias(3)?)?.relu()?)
            }
            1 => {
                // In f32 under mixed precision (the stage sums and the reversible reconstruction
                // need the precision); the casts are graph ops.
                let field: Vec<Tensor> = params[self.field..self.field + 4].iter().map(widen).collect::<Result<_>>()?;
                Ok(self.block.solve(&field, &widen(h)?)?.to_dtype(h.dtype())?)
            }
            2 => linear(&global_avg_pool(h)?, &params[self.field + 4], &params[self.field + 5]),
            _ => Err(Error::model(format!("the odenet has 3 segments, not {}", k + 1))),
        }
    }

    fn describe(&self) -> String {
        let [c, h, w] = self.image_shape;
        format!(
            "odenet {c}x{h}x{w} stem-{w0}-ode[{}]-pool-linear-{}, {} params",
            self.block.solver().describe(),
            self.classes,
            self.layout.len(),
            w0 = self.width,
        )
    }

    fn activations(&self, threads: usize) -> Vec<LayerActivation> {
        let [c, h, w] = self.image_shape;
        let (h1, w1) = spatial_after(self.image_shape, [2].into_iter());
        let (h2, w2) = self.state_hw();
        let stem = LayerActivation::chain(
            "stem",
            &[
                conv(c, self.width, 3, h * w, h1 * w1, threads),
                conv(self.width, self.width, 3, h1 * w1, h2 * w2, threads),
            ],
        );
        vec![
            stem,
            ode_activation(self.block.solver(), self.width, h2 * w2, threads),
            dense(self.width, self.classes, false, true),
        ]
    }
}

/// The ODE block's activation memory per sample (an estimate from the conv factors, not
/// calibrated against measured memory as the other layers' are): one field evaluation keeps two
/// concat-conv layers' worth, a step keeps every stage's evaluation and stage sum; backprop
/// keeps every step, checkpoint its stored states and one step at a time, reversible the final
/// pair and one step at a time.
fn ode_activation(solver: &Solver, width: usize, hw: usize, threads: usize) -> LayerActivation {
    let state = width * hw;
    let eval = LayerActivation::chain(
        "field",
        &[conv(width + 1, width, 3, hw, hw, threads), conv(width + 1, width, 3, hw, hw, threads)],
    );
    let stages = solver.tableau.stages();
    // One increment Ψ with its graph (the reversible scheme's step is two of them).
    let increment = stages * (eval.kept + 2 * state) + state;
    let step = solver.state_tensors() * increment;
    let (kept, transient, name) = match solver.method {
        Method::Backprop | Method::ReversibleBackprop { .. } => (solver.steps * step, eval.transient, "backprop"),
        Method::Checkpoint { checkpoints } => {
            (checkpoints.min(solver.steps) * state + state, step + eval.transient, "checkpoint")
        }
        // The final pair, the output's copy; backward: one increment's graph at a time, the
        // pair being rebuilt and the two adjoints.
        Method::Reversible { .. } => (3 * state, increment + eval.transient + 4 * state, "reversible"),
    };
    LayerActivation {
        name: format!("ode block {width}x{hw} ({name}, {} steps)", solver.steps),
        output: state,
        kept,
        transient,
        eval: eval.eval + (stages + 2) * state,
    }
}

#[cfg(test)]
mod tests {
    use super::{Model, Pass};
    use crate::config::model_config as config;

    #[test]
    fn layout_names_and_keys() {
        let cfg = config("odenet", &["width=8"]).unwrap();
        let m = super::super::build(&cfg, [1, 28, 28], 10).unwrap();
        let names: Vec<&str> = m.layout().params.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "stem.0.weight",
                "stem.0.bias",
                "stem.1.weight",
                "stem.1.bias",
                "ode.conv1.weight",
                "ode.conv1.bias",
                "ode.conv2.weight",
                "ode.conv2.bias",
                "head.weight",
                "head.bias"
            ]
        );
        assert_eq!(m.layout().get("ode.conv1.weight").unwrap().shape, [8, 9, 3, 3]);
        let ode = cfg.ode.as_ref().unwrap();
        assert_eq!((ode.tableau.as_deref(), ode.steps, ode.time), (Some("rk4"), Some(4), Some(1.0)));
        assert!(m.describe().contains("rk4, 4 steps"), "{}", m.describe());

        let err = |sets: &[&str]| config("odenet", sets).unwrap_err().to_string();
        for bad in ["0", "-0.5", "1.5", "nan"] {
            let e = err(&["ode.gradient=reversible", &format!("ode.coupling={bad}")]);
            assert!(e.contains("model.ode.coupling") && e.contains("(0, 1]"), "{e}");
        }
        let e = err(&["ode.coupling=0.9"]);
        assert!(e.contains("model.ode.coupling") && e.contains("reversible"), "{e}");
        let e = err(&["ode.checkpoints=3"]);
        assert!(e.contains("model.ode.checkpoints"), "{e}");
        assert!(err(&["ode.steps=0"]).contains("model.ode.steps"));
        assert!(err(&["ode.tableau=rk5"]).contains("model.ode.tableau"));
        assert!(err(&["ode.gradient=adjoint"]).contains("model.ode.gradient"));
        assert!(err(&["ode.nope=1"]).contains("nope"));
        assert!(config("mlp", &["ode.steps=3"]).unwrap_err().to_string().contains("model.ode"));
        let c = config("odenet", &["ode.gradient=checkpoint", "ode.steps=16"]).unwrap();
        assert_eq!(c.ode.unwrap().checkpoints, Some(4));
        let c = config("odenet", &["ode.gradient=reversible", "ode.coupling=1"]).unwrap();
        assert_eq!(c.ode.unwrap().coupling, Some(1.0));
        assert!(err(&["ode.tableau=custom"]).contains("model.ode.custom_tableau"));
        let e = err(&["ode.tableau=custom", "ode.custom_tableau={a=[[0.0,0.0],[1.0,0.0]], b=[0.5,0.6]}"]);
        assert!(e.contains("model.ode.custom_tableau"), "{e}");
    }

    /// A custom tableau in depth: Heun's method written out computes what the built-in `heun`
    /// computes, bit for bit, with every gradient method.
    #[test]
    fn custom_tableau_is_the_builtin() {
        use candle_core::{Device, Tensor};
        let heun = "ode.custom_tableau={name=\"my-heun\", a=[[0.0,0.0],[1.0,0.0]], b=[0.5,0.5]}";
        for g in ["backprop", "checkpoint", "reversible"] {
            let g = format!("ode.gradient={g}");
            let custom = config("odenet", &["width=4", "ode.tableau=custom", heun, &g]).unwrap();
            let builtin = config("odenet", &["width=4", "ode.tableau=heun", &g]).unwrap();
            let (a, b) = (
                super::super::build(&custom, [1, 8, 8], 3).unwrap(),
                super::super::build(&builtin, [1, 8, 8], 3).unwrap(),
            );
            assert!(a.describe().contains("my-heun"), "{}", a.describe());
            let theta = super::super::init_params(a.as_ref(), 3);
            let params: Vec<Tensor> = a
                .layout()
                .params
                .iter()
                .map(|s| Tensor::from_slice(&theta[s.range()], s.shape.as_slice(), &Device::Cpu).unwrap())
                .collect();
            let x = Tensor::arange(0.0f32, 128.0, &Device::Cpu).unwrap().affine(1.0 / 128.0, 0.0).unwrap();
            let x = x.reshape((2, 64)).unwrap();
            let run = |m: &dyn Model| {
                m.forward(&params, &x, &mut Pass::train()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
            };
            assert_eq!(run(a.as_ref()), run(b.as_ref()), "{g}");
        }
    }
}
