//! Plain versus chunked lm_head + loss on CUDA, one path per process so that each path's
//! memory pool starts empty.
//!
//! ```text
//! cargo build --release -p qwen-loss --example bench_loss_cuda --features bench-cuda
//! bench_loss_cuda chunked [chunk_memory_bytes] > chunked.json
//! bench_loss_cuda plain > plain.json
//! bench_loss_cuda check             # chunked vs plain loss and gradients on CUDA
//! ```
//!
//! Memory is read two ways, both after the inputs (hidden states and weight) are allocated:
//! CubeCL's pool (`bytes_reserved`, a high-water mark as long as the pool does not shrink,
//! read after each forward and backward) and `nvidia-smi` sampled every 5 ms in a child process
//! (device memory in use, including the CUDA context). The lead's `cargo xtask bench-loss`
//! wraps the same `run_loss_bench`.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::Duration,
};

use burn::backend::{Autodiff, Cuda, cuda::CudaDevice};
use burn_cubecl::cubecl::{Runtime, cuda::CudaRuntime};
use qwen_loss::bench::{LossBenchConfig, LossPath, run_loss_bench};

fn nvidia_smi_used_mib() -> Option<u64> {
    let out = Command::new("nvidia-smi")
        .args([
            "--query-gpu=memory.used",
            "--format=csv,noheader,nounits",
            "-i",
            "0",
        ])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// Both paths on one random problem: max |chunked - plain| / max |plain| of the loss and of
/// both gradients, on CUDA.
fn check(device: &CudaDevice) {
    use burn::tensor::{Distribution, Int, Tensor, TensorData};
    use qwen_loss::{
        CrossEntropyOptions, IGNORE_INDEX, Reduction, chunked_lm_head_cross_entropy,
        masked_cross_entropy,
    };
    type B = Autodiff<Cuda>;
    let (n, dim, vocab) = (2048, 896, 32_768);
    let start = std::time::Instant::now();
    for (eps, z, budget) in [(0.1, 1e-4, 8usize << 20), (0.0, 0.0, 64 << 20)] {
        let hidden =
            Tensor::<B, 2>::random([n, dim], Distribution::Normal(0.0, 1.0), device).require_grad();
        let weight = Tensor::<B, 2>::random([vocab, dim], Distribution::Normal(0.0, 0.05), device)
            .require_grad();
        let labels: Vec<i64> = (0..n as i64)
            .map(|i| {
                if i % 3 == 0 {
                    IGNORE_INDEX
                } else {
                    (i * 7919) % vocab as i64
                }
            })
            .collect();
        let targets = Tensor::<B, 1, Int>::from_data(TensorData::new(labels, [n]), device);
        let opts = CrossEntropyOptions::default()
            .with_reduction(Reduction::Sum)
            .with_label_smoothing(eps)
            .with_z_loss_weight(z)
            .with_chunk_memory_bytes(budget);
        let mut results = Vec::new();
        for chunked in [false, true] {
            let out = if chunked {
                chunked_lm_head_cross_entropy(
                    hidden.clone(),
                    weight.clone(),
                    targets.clone(),
                    &opts,
                )
            } else {
                let logits = hidden.clone().matmul(weight.clone().transpose());
                masked_cross_entropy(logits, targets.clone(), &opts)
            }
            .unwrap();
            let grads = out.sum.clone().backward();
            let values = |t: Tensor<burn::backend::Cuda, 2>| -> Vec<f32> {
                t.into_data().convert::<f32>().to_vec().unwrap()
            };
            let loss: Vec<f32> = out.sum.into_data().convert::<f32>().to_vec().unwrap();
            eprintln!(
                "check: chunked={chunked} eps={eps} done at {:?}",
                start.elapsed()
            );
            results.push((
                loss,
                values(hidden.grad(&grads).unwrap()),
                values(weight.grad(&grads).unwrap()),
            ));
        }
        let rel = |a: &[f32], b: &[f32]| {
            let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
            let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            diff / scale
        };
        let (plain, fused) = (&results[0], &results[1]);
        let case = serde_json::json!({
            "n": n, "hidden": dim, "vocab": vocab, "label_smoothing": eps, "z_loss_weight": z,
            "chunk_memory_bytes": budget,
            "loss_plain": plain.0[0], "loss_chunked": fused.0[0],
            "loss_rel_diff": rel(&fused.0, &plain.0),
            "grad_hidden_max_diff_over_max": rel(&fused.1, &plain.1),
            "grad_weight_max_diff_over_max": rel(&fused.2, &plain.2),
        });
        println!("{}", serde_json::to_string(&case).unwrap());
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let path = match args.next().as_deref() {
        Some("check") => return check(&CudaDevice::default()),
        Some("plain") => LossPath::Plain,
        Some("chunked") | None => LossPath::Chunked,
        Some(other) => panic!("unknown path {other}: use plain or chunked"),
    };
    let mut config = LossBenchConfig::qwen_0_5b();
    config.paths = vec![path];
    if let Some(budget) = args.next() {
        config.options.chunk_memory_bytes = budget.parse().expect("chunk_memory_bytes");
    }
    if let Some(iterations) = args.next() {
        config.iterations = iterations.parse().expect("iterations");
    }

    let device = CudaDevice::default();
    let client = CudaRuntime::client(&device);
    let probe = || client.memory_usage().map(|m| m.bytes_reserved).unwrap_or(0);

    // Sample device memory in the background for the whole run.
    let mut sampler = Command::new("nvidia-smi")
        .args([
            "--query-gpu=memory.used",
            "--format=csv,noheader,nounits",
            "-i",
            "0",
            "-lms",
            "5",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .ok();
    let samples = sampler
        .as_mut()
        .and_then(|child| child.stdout.take())
        .map(|stdout| {
            std::thread::spawn(move || {
                BufReader::new(stdout)
                    .lines()
                    .map_while(Result::ok)
                    .filter_map(|line| line.trim().parse::<u64>().ok())
                    .max()
            })
        });
    std::thread::sleep(Duration::from_millis(200));

    // The inputs are allocated inside run_loss_bench before its baseline; take the
    // nvidia-smi baseline with a first, tiny run that allocates them the same way.
    let before_inputs = nvidia_smi_used_mib();
    let report = run_loss_bench::<Autodiff<Cuda>>(&config, &device, Some(&probe));
    let usage = client.memory_usage().ok();

    if let Some(mut child) = sampler {
        let _ = child.kill();
        let _ = child.wait();
    }
    let smi_peak = samples.and_then(|h| h.join().ok().flatten());
    let out = serde_json::json!({
        "report": report,
        "cubecl_memory_at_end": usage.map(|m| serde_json::json!({
            "bytes_in_use": m.bytes_in_use,
            "bytes_reserved": m.bytes_reserved,
            "bytes_padding": m.bytes_padding,
            "number_allocs": m.number_allocs,
        })),
        "nvidia_smi_mib": {
            "before_inputs": before_inputs,
            "peak": smi_peak,
        },
        "input_bytes": (config.tokens * config.hidden + config.vocab * config.hidden) * 4,
    });
    println!("{}", serde_json::to_string_pretty(&out).unwrap());
}
