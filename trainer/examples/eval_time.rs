//! Times one gradient evaluation (`ModelField::eval`: forward + backward in training mode) of a
//! vision model on random CIFAR-shaped data, the number kutta's CPU layers are tuned against.
//!
//! ```text
//! cargo run --release -p kutta-trainer --example eval_time -- resnet18 128 5
//! cargo run --release -p kutta-trainer --example eval_time -- cnn 64 5      # 1×28×28 input
//! cargo run --release -p kutta-trainer --example eval_time -- wrn 128 5     # WRN-16-2
//! ```
//!
//! Arguments: model (resnet18 | cnn | wrn), batch size, repetitions; prints each time and the
//! median. The first evaluation (page faults of fresh buffers) is timed too but left out of the
//! median.

use std::time::Instant;

use kutta_trainer::data::Dataset;
use kutta_trainer::field::VectorField;
use kutta_trainer::model::{cnn::Cnn, init_params, resnet::ResNet18, wrn::WideResNet, Model, ModelField};

fn main() -> kutta_trainer::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let kind = args.get(1).map_or("resnet18", |s| s.as_str());
    let batch: usize = args.get(2).map_or(128, |s| s.parse().expect("batch size"));
    let reps: usize = args.get(3).map_or(3, |s| s.parse().expect("repetitions"));
    let (model, shape): (Box<dyn Model>, [usize; 3]) = match kind {
        "resnet18" => (Box::new(ResNet18::new([3, 32, 32], 64, 10, 32, 0.1)), [3, 32, 32]),
        "cnn" => (Box::new(Cnn::new([1, 28, 28], [20, 10], 10)), [1, 28, 28]),
        "wrn" => (Box::new(WideResNet::new([3, 32, 32], 16, 2, 10, 32, 0.1)), [3, 32, 32]),
        other => panic!("unknown model {other}"),
    };
    let data = Dataset::random(batch, shape, 10, 1);
    let theta = init_params(model.as_ref(), 1);
    let mut grad = vec![0f32; theta.len()];
    let mut field = ModelField::new(model.as_ref(), &data);
    let indices: Vec<usize> = (0..batch).collect();
    field.set_batch(&indices, batch);
    let mut times = Vec::new();
    for r in 0..=reps {
        let t = Instant::now();
        let loss = field.eval(&theta, &mut grad)?;
        let s = t.elapsed().as_secs_f64();
        let norm = grad.iter().map(|&g| (g as f64) * (g as f64)).sum::<f64>().sqrt();
        println!("{kind} batch {batch} eval {r}: {s:.3} s  loss {loss:.6}  |grad| {norm:.6}");
        if r > 0 || reps == 0 {
            times.push(s);
        }
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!("{kind} batch {batch}: median {:.3} s over {} evals", times[times.len() / 2], times.len());
    Ok(())
}
