//! Times one gradient evaluation (`ModelField::eval`: forward + backward in training mode) of a
//! vision model on random CIFAR-shaped data, the number kutta's CPU layers are tuned against.
//!
//! ```text
//! cargo run --release -p kutta-trainer --example eval_time -- resnet18 128 5
//! cargo run --release -p kutta-trainer --example eval_time -- cnn 64 5      # 1×28×28 input
//! cargo run --release -p kutta-trainer --example eval_time -- wrn 128 5     # WRN-16-2
//! cargo run --release -p kutta-trainer --example eval_time -- mlp 16 2000   # 784-500-500-500-10
//! ```
//!
//! Arguments: model (resnet18 | cnn | wrn | mlp), batch size, repetitions; prints each time (wall and
//! process CPU) and the medians. The first evaluation (page faults of fresh buffers) is timed too but left out of the
//! median.

use std::time::Instant;

use kutta_trainer::data::Dataset;
use kutta_trainer::field::VectorField;
use kutta_trainer::model::{
    cnn::Cnn,
    init_params,
    mlp::{self, Mlp},
    resnet::ResNet18,
    wrn::WideResNet,
    Model, ModelField,
};

/// User + system CPU seconds of this process so far (all threads): with two cores shared, the
/// sum is steadier than the wall time.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 * 1e-6;
    t(u.ru_utime) + t(u.ru_stime)
}

fn main() -> kutta_trainer::Result<()> {
    // As `kutta` does at start: the thread count (RAYON_NUM_THREADS, else the cores).
    let threads = kutta_trainer::threads::init(None);
    eprintln!("compute threads: {} ({})", threads.threads, threads.reason);
    let args: Vec<String> = std::env::args().collect();
    let kind = args.get(1).map_or("resnet18", |s| s.as_str());
    let batch: usize = args.get(2).map_or(128, |s| s.parse().expect("batch size"));
    let reps: usize = args.get(3).map_or(3, |s| s.parse().expect("repetitions"));
    let (model, shape): (Box<dyn Model>, [usize; 3]) = match kind {
        "resnet18" => (Box::new(ResNet18::new([3, 32, 32], 64, 10, 32, 0.1)), [3, 32, 32]),
        "cnn" => (Box::new(Cnn::new([1, 28, 28], [20, 10], 10)), [1, 28, 28]),
        "wrn" => (Box::new(WideResNet::new([3, 32, 32], 16, 2, 10, 32, 0.1)), [3, 32, 32]),
        "mlp" => (Box::new(Mlp::new(784, &mlp::DEFAULT_HIDDEN, 10)), [1, 28, 28]),
        other => panic!("unknown model {other}"),
    };
    let data = Dataset::random(batch, shape, 10, 1);
    let theta = init_params(model.as_ref(), 1);
    let mut grad = vec![0f32; theta.len()];
    let mut field = ModelField::new(model.as_ref(), &data);
    let indices: Vec<usize> = (0..batch).collect();
    field.set_batch(&indices, batch);
    let (mut times, mut cpu_times) = (Vec::new(), Vec::new());
    for r in 0..=reps {
        let (t, c) = (Instant::now(), cpu_seconds());
        let loss = field.eval(&theta, &mut grad)?;
        let (s, cpu) = (t.elapsed().as_secs_f64(), cpu_seconds() - c);
        let norm = grad.iter().map(|&g| (g as f64) * (g as f64)).sum::<f64>().sqrt();
        if r < 5 || r == reps {
            println!(
                "{kind} batch {batch} eval {r}: {:.3} ms (cpu {:.3} ms)  loss {loss:.6}  |grad| {norm:.6}",
                s * 1e3,
                cpu * 1e3
            );
        }
        if r > 0 || reps == 0 {
            times.push(s);
            cpu_times.push(cpu);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    println!(
        "{kind} batch {batch}: median {:.3} ms (process cpu {:.3} ms) over {} evals",
        median(&mut times) * 1e3,
        median(&mut cpu_times) * 1e3,
        times.len()
    );
    Ok(())
}
