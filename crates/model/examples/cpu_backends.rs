//! Which CPU backend the `cpu` feature uses: ndarray or flex, timed on our shapes.
//!
//! `cargo xtask bench-cpu` (= `cargo run --release -p qwen-model --example cpu_backends`) prints
//! one JSON line per backend and shape: forward + backward of the model with a sum over the
//! logits, median of 5 after a warm-up.

use std::time::Instant;

use burn::backend::{Autodiff, Flex, NdArray};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor, TensorData};
use qwen_model::{AttentionBackend, Qwen2Config, Qwen2ForCausalLM, Qwen2Input};

fn time<B: AutodiffBackend + AttentionBackend>(
    name: &str,
    hidden: usize,
    seq: usize,
    vocab: usize,
) {
    let device = Default::default();
    let mut config = Qwen2Config::preset("tiny").unwrap();
    config.hidden_size = hidden;
    config.intermediate_size = hidden * 11 / 4;
    config.vocab_size = vocab;
    let model = Qwen2ForCausalLM::<B>::init(&config, &device, 1);
    let ids: Vec<i64> = (0..seq as i64).map(|i| (i * 7919) % vocab as i64).collect();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, seq]), &device);
    let input = Qwen2Input::new(ids);
    let mut times = Vec::new();
    for _ in 0..6 {
        let t = Instant::now();
        let loss = model.forward(&input).sum();
        let _grads = loss.backward();
        B::sync(&device).unwrap();
        times.push(t.elapsed().as_secs_f64());
    }
    times.remove(0);
    times.sort_by(f64::total_cmp);
    println!(
        "{}",
        serde_json::json!({"backend": name, "hidden": hidden, "seq": seq, "vocab": vocab, "forward_backward_ms_median": times[2] * 1e3})
    );
}

fn main() {
    // The demo's shape (tiny preset, real vocabulary) and a wider, longer one.
    for (hidden, seq, vocab) in [(64, 32, 151_936), (256, 256, 32_000)] {
        time::<Autodiff<Flex>>("flex", hidden, seq, vocab);
        time::<Autodiff<NdArray>>("ndarray", hidden, seq, vocab);
    }
}
