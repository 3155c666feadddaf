//! `kutta bench data`: can the input pipeline feed the model? Measures the decoded and augmented
//! training images per second of a config's data (image folders: read, decode, rrc-flip,
//! normalise, as `Dataset::write_training_batch` gathers a batch without the prefetcher) with one
//! decode worker and with `data.workers`, then the model's training step at the config's
//! per-rank batch for sgd and rk4 (`steps::time_interleaved`, on random images of the same
//! shape: step time does not depend on pixel values), and says whether the pipeline keeps up:
//! one step consumes one batch whatever the optimizer (rk4's four gradient evaluations reuse
//! it), so it needs `batch / step time` images per second.
//!
//! `--synthetic DIR` first writes an image folder of photo-sized JPEGs (500×375 by default,
//! smooth gradients and blobs with some texture: they compress and decode like photographs,
//! unlike noise) and benches that.

use super::steps::{median, time_interleaved, variant_config};
use super::DataArgs;
use anyhow::{bail, Result};
use kutta_trainer::config::Config;
use kutta_trainer::data::{sampler::BatchSampler, Dataset};
use kutta_trainer::model::{self, ModelField};
use kutta_trainer::train::{build_model, build_optimizer_on, load_data};
use serde::Serialize;
use std::time::Instant;

#[derive(Debug, Serialize)]
pub struct DecodeRow {
    pub workers: usize,
    pub images: usize,
    pub images_per_s: f64,
    pub images_per_s_per_core: f64,
}

#[derive(Debug, Serialize)]
pub struct ModelRow {
    pub optimizer: String,
    pub median_step_ms: f64,
    pub images_per_s_needed: f64,
    pub keeps_up: bool,
}

#[derive(Debug, Serialize)]
pub struct DataReport {
    pub machine: String,
    pub cores: usize,
    pub compute_threads: usize,
    pub data: String,
    pub per_rank_batch: usize,
    pub decode: Vec<DecodeRow>,
    pub model: String,
    pub steps: Vec<ModelRow>,
}

/// Training images per second of `train` at `batch` per gather, for at least `min_seconds`.
fn decode_rate(train: &Dataset, cfg: &Config, batch: usize, min_seconds: f64) -> Result<(usize, f64)> {
    let d = train.sample_dim();
    let mut out = vec![0f32; batch * d];
    let mut sampler = BatchSampler::new(train.len(), batch, cfg.train.seed, cfg.data.shuffle);
    let (augment, seed) = (cfg.data.augment, cfg.train.seed);
    // Warm-up: the page cache, the allocator, the threads.
    train.write_training_batch(&sampler.batch(0), augment, seed, 0, &mut out).map_err(anyhow::Error::msg)?;
    let t = Instant::now();
    let mut images = 0;
    for step in 1u64.. {
        train.write_training_batch(&sampler.batch(step), augment, seed, step, &mut out).map_err(anyhow::Error::msg)?;
        images += batch;
        if t.elapsed().as_secs_f64() >= min_seconds && images >= 2 * batch {
            break;
        }
    }
    Ok((images, images as f64 / t.elapsed().as_secs_f64()))
}

pub fn main(args: &DataArgs) -> Result<()> {
    let mut sets = args.model.sets.clone();
    if let Some(dir) = &args.synthetic {
        if !dir.join("train").is_dir() {
            let (classes, n) = (10, args.synthetic_images.max(10));
            eprintln!("writing {n} synthetic {}×{} JPEGs to {}", args.width, args.height, dir.display());
            kutta_trainer::data::imagefolder::write_synthetic(
                dir,
                classes,
                n / classes,
                2,
                args.width,
                args.height,
                7,
            )?;
        }
        sets.splice(0..0, ["data.format=imagefolder".to_string(), format!("data.dir={}", dir.display())]);
    }
    let model_args = super::ModelArgs { config: args.model.config.clone(), sets };
    let base = model_args.base()?;
    if args.ranks == 0 || base.train.batch_size % args.ranks != 0 {
        bail!("--ranks {}: must divide train.batch_size = {}", args.ranks, base.train.batch_size);
    }
    let batch = base.train.batch_size / args.ranks;
    let all = base.data.worker_threads();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());

    let mut decode = Vec::new();
    let mut counts = vec![1];
    if all > 1 {
        counts.push(all);
    }
    let mut desc = String::new();
    for workers in counts {
        let mut cfg = base.clone();
        cfg.data.workers = workers;
        let (train, _) = load_data(&cfg)?;
        desc = format!(
            "{:?} in {} ({} training images → {}×{}×{}, augment {:?})",
            cfg.data.format,
            cfg.data.dir.display(),
            train.len(),
            train.image_shape[0],
            train.image_shape[1],
            train.image_shape[2],
            cfg.data.augment
        );
        let (images, rate) = decode_rate(&train, &cfg, batch, args.min_seconds)?;
        if !args.json {
            eprintln!("  decode {workers:>3} worker(s): {rate:>9.1} images/s");
        }
        decode.push(DecodeRow {
            workers,
            images,
            images_per_s: rate,
            images_per_s_per_core: rate / workers.min(cores) as f64,
        });
    }

    // The model's step at the per-rank batch, on random images of the data's shape.
    let (train, _) = load_data(&base)?;
    let n = batch.max(64);
    let d = train.sample_dim();
    let images = (0..n * d).map(|i| ((i * 2_654_435_761usize) % 1000) as f32 / 500.0 - 1.0).collect();
    let labels = (0..n).map(|i| (i % train.num_classes) as u32).collect();
    let random = Dataset::from_f32(images, labels, train.image_shape, train.num_classes);
    let model = build_model(&base, &random)?;
    let theta0 = model::init_params(model.as_ref(), 0);
    let labels_opt = ["sgd", "rk4"];
    let optimizers = labels_opt
        .iter()
        .map(|l| Ok(build_optimizer_on(&variant_config(&base, l, batch)?, &None)?))
        .collect::<Result<Vec<_>>>()?;
    let mut field = ModelField::new(model.as_ref(), &random);
    let cells = time_interleaved(optimizers, &theta0, &mut field, random.len(), batch, |reps, secs| {
        reps >= 200 || (reps >= 3 && secs >= args.min_seconds * 2.0)
    })?;
    let best = decode.last().map_or(0.0, |r| r.images_per_s);
    let steps = labels_opt
        .iter()
        .zip(cells)
        .map(|(l, mut c)| {
            let ms = median(&mut c.step_ms);
            let needed = batch as f64 / (ms / 1e3);
            ModelRow {
                optimizer: l.to_string(),
                median_step_ms: ms,
                images_per_s_needed: needed,
                keeps_up: best >= needed,
            }
        })
        .collect();
    let report = DataReport {
        machine: super::steps::machine_description(),
        cores,
        compute_threads: kutta_trainer::threads::current(),
        data: desc,
        per_rank_batch: batch,
        decode,
        model: model.describe(),
        steps,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{}", format_report(&report));
        let synth = args.synthetic.as_ref().map_or(String::new(), |d| {
            format!(
                " --synthetic {} --synthetic-images {} --width {} --height {}",
                d.display(),
                args.synthetic_images,
                args.width,
                args.height
            )
        });
        println!(
            "reproduce: kutta bench data{}{synth} --ranks {} --min-seconds {}",
            args.model.reproduce_args(),
            args.ranks,
            args.min_seconds
        );
    }
    Ok(())
}

pub fn format_report(r: &DataReport) -> String {
    let mut s = format!(
        "machine: {} ({} cores; model compute on {} threads)\ndata:    {}\nmodel:   {}, per-rank batch {}\n\n",
        r.machine, r.cores, r.compute_threads, r.data, r.model, r.per_rank_batch
    );
    s += &format!("{:<24} {:>12} {:>18}\n", "decode + augment", "images/s", "images/s per core");
    for d in &r.decode {
        s += &format!(
            "{:<24} {:>12.1} {:>18.1}\n",
            format!("{} worker(s)", d.workers),
            d.images_per_s,
            d.images_per_s_per_core
        );
    }
    let best = r.decode.last().map_or(0.0, |d| d.images_per_s);
    s += &format!("\n{:<10} {:>14} {:>22} {:>10}\n", "optimizer", "step ms (med)", "images/s needed", "keeps up");
    for m in &r.steps {
        s += &format!(
            "{:<10} {:>14.2} {:>22.1} {:>10}\n",
            m.optimizer,
            m.median_step_ms,
            m.images_per_s_needed,
            if m.keeps_up { "yes" } else { "NO" }
        );
    }
    s += &format!(
        "\n(needed = batch / step time; one batch per step whatever the optimizer — rk4's 4 gradient\n evaluations reuse it. Compared with {best:.1} images/s from all workers; in training the\n decode workers share the cores with the model.)\n"
    );
    s
}
