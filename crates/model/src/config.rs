//! `Qwen2Config`: the model's `config.json`, field for field.
//!
//! Optional fields carry transformers' defaults. Fields this crate does not use are kept in
//! [`Qwen2Config::extra`] so that a loaded config is written back unchanged.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::ConfigError;

/// The Hugging Face `config.json` of a Qwen2 (or Qwen2.5) causal language model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Qwen2Config {
    /// `"qwen2"` (Qwen2, Qwen2.5) or `"qwen3"` (Qwen3 dense: RMSNorm on each head's queries and
    /// keys, `attention_bias`, a stated `head_dim`).
    #[serde(default = "default_model_type")]
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Grouped-query attention: heads of keys and values. Defaults to `num_attention_heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    /// Per-head width. Qwen2 derives it as `hidden_size / num_attention_heads`; later
    /// configs may state it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// Qwen3 only: biases on q/k/v/o. Qwen2 always has q/k/v biases and no o bias.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_bias: Option<bool>,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    /// transformers 4.x writes `rope_theta` at the top level; 5.x writes `rope_parameters`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<RopeParameters>,
    /// Only `null` is supported: scaled RoPE variants are refused rather than ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<Value>,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub use_sliding_window: bool,
    #[serde(default)]
    pub sliding_window: Option<usize>,
    #[serde(default = "default_max_window_layers")]
    pub max_window_layers: usize,
    /// `"full_attention"` or `"sliding_attention"` per layer, when the config lists them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_types: Option<Vec<String>>,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default = "default_initializer_range")]
    pub initializer_range: f64,
    /// The checkpoint's storage dtype (`"bfloat16"`, `"float32"`, ...). transformers 5.x
    /// calls it `dtype`.
    #[serde(default, alias = "dtype", skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<Value>,
    /// Every other field, kept verbatim for the round trip.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// transformers 5.x's `rope_parameters`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeParameters {
    pub rope_theta: f64,
    #[serde(default = "default_rope_type")]
    pub rope_type: String,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn default_model_type() -> String {
    "qwen2".to_string()
}
fn default_max_position_embeddings() -> usize {
    32768
}
fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_max_window_layers() -> usize {
    28
}
fn default_hidden_act() -> String {
    "silu".to_string()
}
fn default_initializer_range() -> f64 {
    0.02
}
fn default_rope_type() -> String {
    "default".to_string()
}

/// transformers' default when a config names no theta at all.
const DEFAULT_ROPE_THETA: f64 = 10_000.0;

/// The architectures this crate implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Qwen2 and Qwen2.5: biases on q/k/v, none on o.
    Qwen2,
    /// Qwen3 dense: RMSNorm over `head_dim` on queries and keys before RoPE; `attention_bias`
    /// (default false) on all four projections.
    Qwen3,
}

/// How one decoder layer attends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKind {
    Full,
    /// Keys older than this many positions are invisible.
    Sliding(usize),
}

impl Qwen2Config {
    /// Reads and validates a `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json_str(&text).map_err(|err| err.in_file(path))
    }

    /// Parses and validates the text of a `config.json`.
    pub fn from_json_str(text: &str) -> Result<Self, ConfigError> {
        let config: Self = serde_json::from_str(text)
            .map_err(|source| ConfigError::Json { path: None, source })?;
        config.validate()?;
        Ok(config)
    }

    /// The config as pretty JSON, ready to be written as `config.json`.
    pub fn to_json_string(&self) -> String {
        serde_json::to_string_pretty(self).expect("a config always serializes")
    }

    /// Checks the invariants the model relies on, naming the offending field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field: &'static str, reason: String| ConfigError::Invalid {
            path: None,
            field,
            reason,
        };
        if !matches!(self.model_type.as_str(), "qwen2" | "qwen3") {
            return Err(invalid(
                "model_type",
                format!("`{}` is not supported; use qwen2 or qwen3", self.model_type),
            ));
        }
        for (field, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if value == 0 {
                return Err(invalid(field, "must be positive".into()));
            }
        }
        let kv_heads = self.num_key_value_heads();
        if kv_heads == 0 || !self.num_attention_heads.is_multiple_of(kv_heads) {
            return Err(invalid(
                "num_key_value_heads",
                format!(
                    "{kv_heads} does not divide num_attention_heads = {}",
                    self.num_attention_heads
                ),
            ));
        }
        if self.head_dim.is_none()
            && self.family() == Family::Qwen2
            && !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(invalid(
                "hidden_size",
                format!(
                    "{} is not a multiple of num_attention_heads = {}",
                    self.hidden_size, self.num_attention_heads
                ),
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(invalid(
                "head_dim",
                format!("{} must be even for rotary embeddings", self.head_dim()),
            ));
        }
        if self.hidden_act != "silu" {
            return Err(invalid(
                "hidden_act",
                format!("`{}` is not supported; Qwen2 uses `silu`", self.hidden_act),
            ));
        }
        if self.rms_norm_eps.is_nan() || self.rms_norm_eps <= 0.0 {
            return Err(invalid("rms_norm_eps", "must be positive".into()));
        }
        if self.rope_theta().is_nan() || self.rope_theta() <= 0.0 {
            return Err(invalid("rope_theta", "must be positive".into()));
        }
        if let Some(scaling) = &self.rope_scaling
            && !scaling.is_null()
        {
            return Err(invalid(
                "rope_scaling",
                format!("scaled RoPE ({scaling}) is not supported; only `null`"),
            ));
        }
        if let Some(params) = &self.rope_parameters
            && params.rope_type != "default"
        {
            return Err(invalid(
                "rope_parameters.rope_type",
                format!("`{}` is not supported; only `default`", params.rope_type),
            ));
        }
        if self.use_sliding_window && self.sliding_window.is_none_or(|w| w == 0) {
            return Err(invalid(
                "sliding_window",
                "must be a positive integer when use_sliding_window is true".into(),
            ));
        }
        if let Some(types) = &self.layer_types {
            if types.len() != self.num_hidden_layers {
                return Err(invalid(
                    "layer_types",
                    format!(
                        "lists {} layers, num_hidden_layers is {}",
                        types.len(),
                        self.num_hidden_layers
                    ),
                ));
            }
            for kind in types {
                match kind.as_str() {
                    "full_attention" => {}
                    "sliding_attention" if self.sliding_window.is_some() => {}
                    other => {
                        return Err(invalid(
                            "layer_types",
                            format!("`{other}` is not a usable layer type here"),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    pub fn num_key_value_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn family(&self) -> Family {
        match self.model_type.as_str() {
            "qwen3" => Family::Qwen3,
            _ => Family::Qwen2,
        }
    }

    /// Qwen2 derives it from the hidden size; Qwen3's default is 128, as in transformers.
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(match self.family() {
            Family::Qwen2 => self.hidden_size / self.num_attention_heads,
            Family::Qwen3 => 128,
        })
    }

    /// Whether the (q, k, v, o) projections have biases.
    pub fn projection_biases(&self) -> (bool, bool) {
        match self.family() {
            Family::Qwen2 => (true, false),
            Family::Qwen3 => {
                let bias = self.attention_bias.unwrap_or(false);
                (bias, bias)
            }
        }
    }

    pub fn rope_theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .map(|p| p.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(DEFAULT_ROPE_THETA)
    }

    /// The attention of layer `layer`, following transformers: explicit `layer_types` win;
    /// otherwise layers from `max_window_layers` on slide when `use_sliding_window` is set.
    pub fn attention_kind(&self, layer: usize) -> AttentionKind {
        let window = self.sliding_window.unwrap_or(0);
        let sliding = match &self.layer_types {
            Some(types) => types[layer] == "sliding_attention",
            None => self.use_sliding_window && layer >= self.max_window_layers,
        };
        if sliding && self.use_sliding_window {
            AttentionKind::Sliding(window)
        } else {
            AttentionKind::Full
        }
    }

    /// Parameter count. With tied embeddings the lm_head adds nothing.
    pub fn num_parameters(&self) -> usize {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let q = self.num_attention_heads * self.head_dim();
        let kv = self.num_key_value_heads() * self.head_dim();
        let (qkv_bias, o_bias) = self.projection_biases();
        let mut attention = h * q + 2 * h * kv + q * h;
        if qkv_bias {
            attention += q + 2 * kv;
        }
        if o_bias {
            attention += h;
        }
        if self.family() == Family::Qwen3 {
            attention += 2 * self.head_dim();
        }
        let mlp = 3 * h * i;
        let norms = 2 * h;
        let embeddings = v * h;
        let lm_head = if self.tie_word_embeddings { 0 } else { v * h };
        embeddings + self.num_hidden_layers * (attention + mlp + norms) + h + lm_head
    }

    /// A size preset: `tiny` (a few million parameters with the real vocabulary),
    /// `tiny-deep` (16 narrow layers with 0.5b's MLP ratio, so that on the CPU a step's stored
    /// activations outweigh the parameters and optimizer state, for memory measurements), or
    /// the shapes of Qwen2.5 `0.5b`, `1.5b` and `7b`.
    pub fn preset(name: &str) -> Option<Self> {
        let (vocab, hidden, inter, layers, heads, kv, tied) = match name {
            "tiny" => (151_936, 64, 176, 2, 4, 2, true),
            "tiny-deep" => (151_936, 128, 704, 16, 2, 1, true),
            "0.5b" => (151_936, 896, 4864, 24, 14, 2, true),
            "1.5b" => (151_936, 1536, 8960, 28, 12, 2, true),
            "7b" => (152_064, 3584, 18944, 28, 28, 4, false),
            _ => return None,
        };
        Some(Self {
            model_type: "qwen2".into(),
            attention_bias: None,
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: inter,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: Some(kv),
            head_dim: None,
            max_position_embeddings: 32768,
            rope_theta: Some(1_000_000.0),
            rope_parameters: None,
            rope_scaling: None,
            rms_norm_eps: 1e-6,
            tie_word_embeddings: tied,
            use_sliding_window: false,
            sliding_window: None,
            max_window_layers: layers,
            layer_types: None,
            hidden_act: "silu".into(),
            initializer_range: 0.02,
            torch_dtype: Some("bfloat16".into()),
            bos_token_id: Some(Value::from(151_643)),
            eos_token_id: Some(Value::from(151_645)),
            pad_token_id: None,
            extra: Map::from_iter([
                (
                    "architectures".to_string(),
                    Value::from(vec!["Qwen2ForCausalLM"]),
                ),
                ("attention_dropout".to_string(), Value::from(0.0)),
                ("use_cache".to_string(), Value::from(true)),
            ]),
        })
    }

    /// The names accepted by [`Qwen2Config::preset`].
    pub const PRESETS: [&'static str; 5] = ["tiny", "tiny-deep", "0.5b", "1.5b", "7b"];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qwen25_05b_parameter_count() {
        let config = Qwen2Config::preset("0.5b").unwrap();
        assert_eq!(config.num_parameters(), 494_032_768);
    }

    /// Qwen3-0.6B's shapes: transformers counts 596,049,920 parameters.
    #[test]
    fn qwen3_parameter_count() {
        let config = Qwen2Config::from_json_str(
            r#"{"model_type": "qwen3", "vocab_size": 151936, "hidden_size": 1024,
                "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
                "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": true}"#,
        )
        .unwrap();
        assert_eq!(config.family(), Family::Qwen3);
        assert_eq!(config.num_parameters(), 596_049_920);
    }

    #[test]
    fn unknown_model_type_is_refused() {
        let err = Qwen2Config::from_json_str(
            r#"{"model_type": "llama", "vocab_size": 10, "hidden_size": 8,
                "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}"#,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("model_type") && err.to_string().contains("llama"),
            "{err}"
        );
    }

    #[test]
    fn presets_validate() {
        for name in Qwen2Config::PRESETS {
            Qwen2Config::preset(name).unwrap().validate().unwrap();
        }
    }
}
