//! Text generation with the KV cache: prefill the prompt once, then one token at a time.
//!
//! Sampling follows transformers' processors in their order: repetition penalty, temperature,
//! top-k, top-p. Token ids past the tokenizer's vocabulary (the model's embedding is padded to
//! 151936 rows) are never produced.

use std::collections::HashSet;

use burn::tensor::{Int, Tensor, TensorData};
use qwen_model::{AttentionBackend, KvCache, Qwen2Config, Qwen2ForCausalLM, Qwen2Input};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;

/// The fields of `generation_config.json` that generation uses, with transformers' defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct GenerationConfig {
    pub do_sample: bool,
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: usize,
    pub repetition_penalty: f64,
    pub max_new_tokens: usize,
    #[serde(deserialize_with = "one_or_many")]
    pub eos_token_id: Vec<u32>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            do_sample: false,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 50,
            repetition_penalty: 1.0,
            max_new_tokens: 512,
            eos_token_id: Vec::new(),
        }
    }
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u32>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(u32),
        Many(Vec<u32>),
        Null(()),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(id) => vec![id],
        OneOrMany::Many(ids) => ids,
        OneOrMany::Null(()) => Vec::new(),
    })
}

impl GenerationConfig {
    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// Greedy decoding, whatever the file said.
    pub fn greedy(mut self) -> Self {
        self.do_sample = false;
        self
    }
}

/// Generates after `prompt` until an id of `stop` (or `generation.eos_token_id`) or
/// `generation.max_new_tokens`. `on_token` sees each new id as it is chosen. Returns the new ids,
/// the stop token excluded.
#[allow(clippy::too_many_arguments)]
pub fn generate<B: AttentionBackend>(
    model: &Qwen2ForCausalLM<B>,
    config: &Qwen2Config,
    prompt: &[u32],
    generation: &GenerationConfig,
    stop: &[u32],
    vocab_limit: usize,
    seed: u64,
    mut on_token: impl FnMut(u32),
) -> Vec<u32> {
    let device = model.lm_head_weight().device();
    let stop: HashSet<u32> = stop
        .iter()
        .chain(&generation.eos_token_id)
        .copied()
        .collect();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut cache = KvCache::new(config);
    let mut seen: Vec<u32> = prompt.to_vec();
    let mut generated = Vec::new();
    let mut step_input: Vec<u32> = prompt.to_vec();
    while generated.len() < generation.max_new_tokens {
        let ids: Vec<i64> = step_input.iter().map(|&id| i64::from(id)).collect();
        let n = ids.len();
        let ids = Tensor::<B, 2, Int>::from_data(
            TensorData::new(ids, [1, n]).convert::<B::IntElem>(),
            &device,
        );
        // [1, n, vocab] -> the last position's logits on the host.
        let logits = model.forward_cached(&Qwen2Input::new(ids), &mut cache);
        let vocab = logits.dims()[2];
        let last: Vec<f32> = logits
            .narrow(1, n - 1, 1)
            .reshape([vocab])
            .into_data()
            .convert::<f32>()
            .to_vec()
            .expect("float data");
        let token = choose(last, &seen, generation, vocab_limit, &mut rng);
        if stop.contains(&token) {
            break;
        }
        on_token(token);
        generated.push(token);
        seen.push(token);
        step_input = vec![token];
    }
    generated
}

/// Picks the next token from one position's logits.
fn choose(
    mut logits: Vec<f32>,
    seen: &[u32],
    generation: &GenerationConfig,
    vocab_limit: usize,
    rng: &mut impl Rng,
) -> u32 {
    for value in logits.iter_mut().skip(vocab_limit) {
        *value = f32::NEG_INFINITY;
    }
    if generation.repetition_penalty != 1.0 {
        let penalty = generation.repetition_penalty as f32;
        let unique: HashSet<u32> = seen.iter().copied().collect();
        for id in unique {
            if let Some(value) = logits.get_mut(id as usize) {
                *value = if *value < 0.0 {
                    *value * penalty
                } else {
                    *value / penalty
                };
            }
        }
    }
    if !generation.do_sample {
        return argmax(&logits);
    }
    let temperature = generation.temperature.max(1e-6) as f32;
    // Candidates by descending logit.
    let mut order: Vec<usize> = (0..logits.len())
        .filter(|&i| logits[i].is_finite())
        .collect();
    order.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if generation.top_k > 0 {
        order.truncate(generation.top_k);
    }
    let max = logits[order[0]] / temperature;
    let weights: Vec<f64> = order
        .iter()
        .map(|&i| f64::from((logits[i] / temperature - max).exp()))
        .collect();
    let total: f64 = weights.iter().sum();
    // top-p keeps the smallest prefix whose probability reaches top_p (at least one token).
    let mut kept = 0;
    let mut mass = 0.0;
    for w in &weights {
        kept += 1;
        mass += w / total;
        if mass >= generation.top_p {
            break;
        }
    }
    let weights = &weights[..kept];
    let total: f64 = weights.iter().sum();
    let mut draw = rng.random::<f64>() * total;
    for (k, w) in weights.iter().enumerate() {
        draw -= w;
        if draw <= 0.0 {
            return order[k] as u32;
        }
    }
    order[kept - 1] as u32
}

fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_picks_ids_past_the_vocabulary() {
        let mut logits = vec![0.0f32; 10];
        logits[8] = 100.0;
        let generation = GenerationConfig::default();
        let mut rng = StdRng::seed_from_u64(0);
        assert_ne!(choose(logits.clone(), &[], &generation, 8, &mut rng), 8);
        let sampling = GenerationConfig {
            do_sample: true,
            top_k: 0,
            ..generation
        };
        for _ in 0..100 {
            assert!(choose(logits.clone(), &[], &sampling, 8, &mut rng) < 8);
        }
    }

    #[test]
    fn repetition_penalty_follows_transformers() {
        // Positive logits are divided, negative ones multiplied.
        let generation = GenerationConfig {
            repetition_penalty: 2.0,
            ..Default::default()
        };
        let mut rng = StdRng::seed_from_u64(0);
        assert_eq!(
            choose(vec![3.0, 2.0, -1.0], &[0], &generation, 3, &mut rng),
            1
        );
        assert_eq!(
            choose(vec![-1.0, -1.5, -3.0], &[0], &generation, 3, &mut rng),
            1
        );
    }

    #[test]
    fn top_k_one_is_greedy() {
        let generation = GenerationConfig {
            do_sample: true,
            top_k: 1,
            temperature: 5.0,
            ..Default::default()
        };
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..20 {
            assert_eq!(
                choose(vec![0.1, 0.3, 0.2], &[], &generation, 3, &mut rng),
                1
            );
        }
    }

    #[test]
    fn reads_qwen_generation_config() {
        let generation =
            GenerationConfig::from_json(crate::source::QWEN25_GENERATION_CONFIG.as_bytes())
                .unwrap();
        assert!(generation.do_sample);
        assert_eq!(generation.eos_token_id, vec![151645, 151643]);
        assert_eq!(
            (generation.top_k, generation.top_p, generation.temperature),
            (20, 0.8, 0.7)
        );
    }
}
