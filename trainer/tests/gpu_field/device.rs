//! The device half of `gpu_field.rs` (feature `cuda`).

use candle_core::cuda::cudarc::driver::{CudaContext, CudaSlice};
use candle_core::Device;
use kutta_trainer::data::Dataset;
use kutta_trainer::field::VectorField;
use kutta_trainer::kernels::cuda::RkKernels;
use kutta_trainer::model::{cnn::Cnn, mlp::Mlp, Model, ModelField};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

/// Device 0 as candle sees it, and the RK kernels on candle's stream of it; None after printing
/// why they cannot be had here.
fn device_or_skip() -> Option<(Device, RkKernels)> {
    match CudaContext::device_count() {
        Ok(n) if n > 0 => {}
        Ok(_) => {
            eprintln!("SKIPPED: gpu_field tests need a CUDA device: the driver reports none");
            return None;
        }
        Err(e) => {
            eprintln!("SKIPPED: gpu_field tests need a usable CUDA device: {e}");
            return None;
        }
    }
    let device = match Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("SKIPPED: gpu_field tests cannot open GPU 0: {e}");
            return None;
        }
    };
    let stream = device.as_cuda_device().expect("a CUDA device").cuda_stream();
    let kernels = RkKernels::new(stream).expect("the RK kernels load on candle's stream");
    Some((device, kernels))
}

fn random_data(n: usize, image_shape: [usize; 3], classes: usize, seed: u64) -> Dataset {
    Dataset::random(n, image_shape, classes, seed)
}

fn random_theta(p: usize, scale: f32, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..p).map(|_| scale * rng.sample::<f32, _>(StandardNormal)).collect()
}

/// `eval_device` at θ: the loss and the gradient, copied back to the host.
fn eval_on_device(field: &mut ModelField, k: &RkKernels, theta: &[f32]) -> (f64, Vec<f32>) {
    let s = k.stream();
    let theta_d: CudaSlice<f32> = s.clone_htod(theta).unwrap();
    // NaN-filled, so a gradient entry the device path fails to write shows.
    let mut grad_d = s.clone_htod(&vec![f32::NAN; theta.len()]).unwrap();
    let loss = field.eval_device(k, &theta_d, &mut grad_d).unwrap();
    (loss, s.clone_dtoh(&grad_d).unwrap())
}

/// Compare `eval_device` with `eval` on `field`'s current settings at two θ (the second rewrites
/// the cached parameter tensors). Returns how many gradient entries differ in any bit.
fn compare(field: &mut ModelField, k: &RkKernels, what: &str, p: usize) -> usize {
    let mut differ = 0;
    for seed in [3, 4] {
        let theta = random_theta(p, 0.5, seed);
        let mut host = vec![f32::NAN; p];
        let host_loss = field.eval(&theta, &mut host).unwrap();
        let (dev_loss, dev) = eval_on_device(field, k, &theta);
        assert!(host_loss.is_finite() && host_loss > 0.0, "{what}: host loss {host_loss}");
        assert!(
            (dev_loss - host_loss).abs() <= 1e-6 * host_loss.abs(),
            "{what}, θ seed {seed}: device loss {dev_loss} vs host {host_loss}"
        );
        let gmax = host.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert!(gmax > 0.0, "{what}: zero gradient");
        let worst = host.iter().zip(&dev).map(|(a, b)| (a - b).abs()).fold(0.0f32, |m, d| {
            if d.is_nan() {
                f32::INFINITY
            } else {
                m.max(d)
            }
        });
        assert!(worst <= 1e-6 * gmax, "{what}, θ seed {seed}: max |Δg| = {worst:e}, max |g| = {gmax:e}");
        let d = host.iter().zip(&dev).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        eprintln!(
            "{what}, θ seed {seed}: loss {}, {d} of {p} gradient entries differ in some bit (max |Δg| {worst:e})",
            if dev_loss.to_bits() == host_loss.to_bits() { "bit-identical" } else { "differs in the last bits" }
        );
        differ += d;
    }
    differ
}

#[test]
fn eval_device_matches_host_eval() {
    let Some((device, k)) = device_or_skip() else { return };
    let mlp = Mlp::new(12, &[9, 7], 4);
    let cnn = Cnn::new([2, 6, 6], [3, 4], 5);
    let cases: [(&dyn Model, Dataset); 2] =
        [(&mlp, random_data(11, [3, 2, 2], 4, 1)), (&cnn, random_data(11, [2, 6, 6], 5, 2))];
    let mut total_differ = 0;
    for (model, data) in &cases {
        let p = model.layout().len();
        let mut field = ModelField::new(*model, data);
        field.set_device(device.clone());
        field.set_batch(&[8, 1, 3, 3, 0, 6, 2, 10], 9);
        for (label, micro, recompute) in
            [("plain", 0, false), ("micro 3", 3, false), ("recompute", 0, true), ("recompute + micro 3", 3, true)]
        {
            field.set_micro_batch(micro);
            field.set_recompute(recompute);
            total_differ += compare(&mut field, &k, &format!("{} {label}", model.describe()), p);
        }
        // An empty slice of the global batch: loss 0, gradient zeroed.
        field.set_batch(&[], 9);
        let (loss, g) = eval_on_device(&mut field, &k, &random_theta(p, 0.5, 5));
        assert_eq!(loss, 0.0);
        assert!(g.iter().all(|&v| v == 0.0));
    }
    eprintln!("eval_device_matches_host_eval: {total_differ} gradient entries differ in some bit over all cases");
}

#[test]
fn eval_device_errors_not_panics() {
    let Some((device, k)) = device_or_skip() else { return };
    let model = Mlp::new(4, &[3], 2);
    let data = random_data(5, [1, 2, 2], 2, 1);
    let p = model.layout().len();
    let s = k.stream();
    let theta = s.alloc_zeros::<f32>(p).unwrap();
    let mut grad = s.alloc_zeros::<f32>(p).unwrap();
    let mut field = ModelField::new(&model, &data);
    field.set_batch(&[0, 1], 2);
    assert!(field.eval_device(&k, &theta, &mut grad).is_err(), "model on the CPU");
    field.set_device(device.clone());
    assert!(field.eval_device(&k, &theta, &mut grad).is_ok());
    let short = s.alloc_zeros::<f32>(p - 1).unwrap();
    assert!(field.eval_device(&k, &short, &mut grad).is_err(), "θ too short");
    let long = s.alloc_zeros::<f32>(p + 1).unwrap();
    assert!(field.eval_device(&k, &long, &mut grad).is_err(), "θ too long");
    let mut short_grad = s.alloc_zeros::<f32>(p - 1).unwrap();
    assert!(field.eval_device(&k, &theta, &mut short_grad).is_err(), "gradient too short");
    // Kernels on another stream of the same context (the context's legacy default stream).
    let other = RkKernels::new(device.as_cuda_device().unwrap().cuda_stream().context().default_stream()).unwrap();
    let e = field.eval_device(&other, &theta, &mut grad).unwrap_err().to_string();
    assert!(e.contains("stream"), "{e}");
    // Kernels built on another thread (candle's stream is per thread).
    let stream = device.as_cuda_device().unwrap().cuda_stream();
    let foreign = std::thread::spawn(move || RkKernels::new(stream).unwrap()).join().unwrap();
    let e = field.eval_device(&foreign, &theta, &mut grad).unwrap_err().to_string();
    assert!(e.contains("another thread"), "{e}");
    field.set_batch(&[0, 9], 2);
    assert!(field.eval_device(&k, &theta, &mut grad).is_err(), "index out of range");
    field.set_batch(&[0, 1], 2);
    assert!(field.eval_device(&k, &theta, &mut grad).is_ok());
}
