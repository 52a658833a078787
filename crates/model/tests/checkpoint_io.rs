//! Checkpoint I/O: the round trip, and every load error, each checked by its message.

mod common;

use std::collections::HashMap;
use std::path::Path;

use burn::tensor::{DType, Tensor};
use common::{B, device, fixture_dir};
use qwen_model::{
    Qwen2Config, Qwen2ForCausalLM, Qwen2Input, SaveDtype, SaveOptions, load_pretrained,
    named_parameters, save_pretrained,
};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// A temporary copy of a fixture checkpoint, to be broken by the test.
fn scratch(variant: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture_dir(variant), dir.path());
    dir
}

/// Rewrites `file` in `dir` after `edit` changed its tensors.
fn rewrite(
    dir: &Path,
    file: &str,
    edit: impl FnOnce(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>),
) {
    let path = dir.join(file);
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<_> = st
        .iter()
        .map(|(name, v)| {
            (
                name.to_string(),
                v.dtype(),
                v.shape().to_vec(),
                v.data().to_vec(),
            )
        })
        .collect();
    edit(&mut tensors);
    let views: Vec<_> = tensors
        .iter()
        .map(|(name, dtype, shape, data)| {
            (
                name.clone(),
                TensorView::new(*dtype, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    safetensors::tensor::serialize_to_file(views, None, &path).unwrap();
}

fn load_err(dir: &Path) -> String {
    match load_pretrained::<B>(dir, &device(), DType::F32) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(err) => err.to_string(),
    }
}

fn assert_contains(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(
            message.contains(part),
            "`{message}` does not mention `{part}`"
        );
    }
}

fn logits(model: &Qwen2ForCausalLM<B>) -> Vec<f32> {
    let ids = Tensor::from_data([[1i64, 50_000, 151_935, 7, 151_643]], &device());
    model
        .forward(&Qwen2Input::new(ids))
        .into_data()
        .to_vec::<f32>()
        .unwrap()
}

fn parameters(model: &Qwen2ForCausalLM<B>) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    named_parameters(model)
        .into_iter()
        .map(|(name, t, shape)| (name, shape, t.into_data().to_vec::<f32>().unwrap()))
        .collect()
}

#[test]
fn round_trip_f32_is_bit_exact() {
    for (variant, max_shard_bytes) in [
        ("tied_f32", u64::MAX),
        ("untied_bf16", 1_000_000),
        ("qwen3_tied_f32", u64::MAX),
    ] {
        let (config, model) =
            load_pretrained::<B>(fixture_dir(variant), &device(), DType::F32).unwrap();
        let out = tempfile::tempdir().unwrap();
        let opts = SaveOptions {
            dtype: SaveDtype::F32,
            max_shard_bytes,
        };
        save_pretrained(&model, &config, out.path(), &opts).unwrap();
        let (config2, model2) = load_pretrained::<B>(out.path(), &device(), DType::F32).unwrap();
        assert_eq!(config2.tie_word_embeddings, config.tie_word_embeddings);
        assert_eq!(parameters(&model), parameters(&model2), "{variant}");
        assert_eq!(logits(&model), logits(&model2), "{variant}");
        let sharded = out.path().join("model.safetensors.index.json").exists();
        assert_eq!(sharded, max_shard_bytes != u64::MAX, "{variant}");
    }
}

#[test]
fn round_trip_bf16_is_bit_exact() {
    // The fixture stores bf16; widening to f32 and narrowing back must give the same bits.
    let (config, model) =
        load_pretrained::<B>(fixture_dir("untied_bf16"), &device(), DType::F32).unwrap();
    let out = tempfile::tempdir().unwrap();
    save_pretrained(&model, &config, out.path(), &SaveOptions::default()).unwrap();
    let original = std::fs::read(fixture_dir("untied_bf16").join("model.safetensors")).unwrap();
    let saved = std::fs::read(out.path().join("model.safetensors")).unwrap();
    let a = SafeTensors::deserialize(&original).unwrap();
    let b = SafeTensors::deserialize(&saved).unwrap();
    let mut names = a.names();
    names.sort();
    let mut saved_names = b.names();
    saved_names.sort();
    assert_eq!(names, saved_names);
    for name in names {
        let (x, y) = (a.tensor(name).unwrap(), b.tensor(name).unwrap());
        assert_eq!(y.dtype(), Dtype::BF16, "{name}");
        assert_eq!(x.shape(), y.shape(), "{name}");
        assert_eq!(x.data(), y.data(), "{name}");
    }
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(written["torch_dtype"], "bfloat16");
}

#[test]
fn tied_model_is_saved_without_lm_head() {
    let config = Qwen2Config::preset("tiny").unwrap();
    let model = Qwen2ForCausalLM::<B>::init(&config, &device(), 7);
    let out = tempfile::tempdir().unwrap();
    save_pretrained(&model, &config, out.path(), &SaveOptions::default()).unwrap();
    let bytes = std::fs::read(out.path().join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert!(st.tensor("lm_head.weight").is_err());
    assert!(st.tensor("model.embed_tokens.weight").is_ok());
    assert_eq!(st.len(), 1 + 2 * 12 + 1);
}

#[test]
fn tied_checkpoint_with_identical_lm_head_loads() {
    let dir = scratch("tied_f32");
    rewrite(dir.path(), "model.safetensors", |t| {
        let embed = t
            .iter()
            .find(|x| x.0 == "model.embed_tokens.weight")
            .unwrap()
            .clone();
        t.push(("lm_head.weight".into(), embed.1, embed.2, embed.3));
    });
    load_pretrained::<B>(dir.path(), &device(), DType::F32).unwrap();
}

#[test]
fn tied_checkpoint_with_different_lm_head_fails() {
    let dir = scratch("tied_f32");
    rewrite(dir.path(), "model.safetensors", |t| {
        let mut embed = t
            .iter()
            .find(|x| x.0 == "model.embed_tokens.weight")
            .unwrap()
            .clone();
        embed.3[0] ^= 1;
        t.push(("lm_head.weight".into(), embed.1, embed.2, embed.3));
    });
    assert_contains(
        &load_err(dir.path()),
        &["model.safetensors", "lm_head.weight", "differs"],
    );
}

#[test]
fn missing_tensor() {
    let dir = scratch("tied_f32");
    rewrite(dir.path(), "model.safetensors", |t| {
        t.retain(|x| x.0 != "model.layers.1.self_attn.k_proj.bias")
    });
    assert_contains(
        &load_err(dir.path()),
        &[
            "missing tensor",
            "model.layers.1.self_attn.k_proj.bias",
            "[4]",
        ],
    );
}

#[test]
fn unexpected_tensor() {
    let dir = scratch("tied_f32");
    rewrite(dir.path(), "model.safetensors", |t| {
        t.push((
            "model.layers.0.self_attn.o_proj.bias".into(),
            Dtype::F32,
            vec![8],
            vec![0; 32],
        ))
    });
    assert_contains(
        &load_err(dir.path()),
        &[
            "model.safetensors",
            "unexpected tensor",
            "model.layers.0.self_attn.o_proj.bias",
        ],
    );
}

#[test]
fn shape_mismatch() {
    let dir = scratch("tied_f32");
    rewrite(dir.path(), "model.safetensors", |t| {
        let q = t
            .iter_mut()
            .find(|x| x.0 == "model.layers.0.self_attn.q_proj.bias")
            .unwrap();
        q.2 = vec![2, 4];
    });
    assert_contains(
        &load_err(dir.path()),
        &[
            "model.safetensors",
            "model.layers.0.self_attn.q_proj.bias",
            "[2, 4]",
            "expected [8]",
        ],
    );
}

#[test]
fn unsupported_dtype() {
    let dir = scratch("tied_f32");
    rewrite(dir.path(), "model.safetensors", |t| {
        let q = t.iter_mut().find(|x| x.0 == "model.norm.weight").unwrap();
        q.1 = Dtype::I32;
    });
    assert_contains(
        &load_err(dir.path()),
        &["model.safetensors", "model.norm.weight", "I32"],
    );
}

#[test]
fn truncated_file() {
    let dir = scratch("tied_f32");
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    assert_contains(
        &load_err(dir.path()),
        &["model.safetensors", "not a valid safetensors file"],
    );
}

#[test]
fn corrupt_header() {
    let dir = scratch("tied_f32");
    let path = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[10] = b'#';
    std::fs::write(&path, &bytes).unwrap();
    assert_contains(
        &load_err(dir.path()),
        &["model.safetensors", "not a valid safetensors file"],
    );
}

#[test]
fn no_weights() {
    let dir = scratch("tied_f32");
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    assert_contains(
        &load_err(dir.path()),
        &["neither model.safetensors nor model.safetensors.index.json"],
    );
}

#[test]
fn index_not_json() {
    let dir = scratch("tied_bf16_sharded");
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        "{ not json",
    )
    .unwrap();
    assert_contains(
        &load_err(dir.path()),
        &["model.safetensors.index.json", "broken index"],
    );
}

#[test]
fn index_without_weight_map() {
    let dir = scratch("tied_bf16_sharded");
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        r#"{"metadata": {}}"#,
    )
    .unwrap();
    assert_contains(
        &load_err(dir.path()),
        &["model.safetensors.index.json", "no `weight_map`"],
    );
}

fn edit_index(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let path = dir.join("model.safetensors.index.json");
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(index["weight_map"].as_object_mut().unwrap());
    std::fs::write(&path, index.to_string()).unwrap();
}

#[test]
fn index_names_a_missing_shard() {
    let dir = scratch("tied_bf16_sharded");
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    assert_contains(
        &load_err(dir.path()),
        &["cannot read", "model-00002-of-00002.safetensors"],
    );
}

#[test]
fn index_lists_a_tensor_the_shard_lacks() {
    let dir = scratch("tied_bf16_sharded");
    edit_index(dir.path(), |map| {
        map.insert(
            "model.layers.0.mlp.extra.weight".into(),
            "model-00002-of-00002.safetensors".into(),
        );
    });
    assert_contains(
        &load_err(dir.path()),
        &[
            "model.layers.0.mlp.extra.weight",
            "missing from model-00002-of-00002.safetensors",
        ],
    );
}

#[test]
fn shard_holds_a_tensor_the_index_does_not_list() {
    let dir = scratch("tied_bf16_sharded");
    edit_index(dir.path(), |map| {
        map.remove("model.norm.weight");
    });
    assert_contains(
        &load_err(dir.path()),
        &[
            "model.norm.weight",
            "is in model-00002-of-00002.safetensors",
            "index maps it to nothing",
        ],
    );
}

#[test]
fn index_shard_name_outside_the_directory() {
    let dir = scratch("tied_bf16_sharded");
    edit_index(dir.path(), |map| {
        map.insert(
            "model.norm.weight".into(),
            "../elsewhere.safetensors".into(),
        );
    });
    assert_contains(
        &load_err(dir.path()),
        &["broken index", "../elsewhere.safetensors"],
    );
}

#[test]
fn config_missing_field() {
    let dir = scratch("tied_f32");
    let path = dir.path().join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config.as_object_mut().unwrap().remove("hidden_size");
    std::fs::write(&path, config.to_string()).unwrap();
    assert_contains(
        &load_err(dir.path()),
        &["config.json", "missing field `hidden_size`"],
    );
}

#[test]
fn config_wrong_type_and_bad_values() {
    let cases: [(&str, serde_json::Value, &[&str]); 4] = [
        (
            "num_hidden_layers",
            "two".into(),
            &["config.json", "invalid type"],
        ),
        (
            "num_key_value_heads",
            3.into(),
            &["config.json", "num_key_value_heads", "does not divide"],
        ),
        (
            "hidden_act",
            "gelu".into(),
            &["config.json", "hidden_act", "gelu"],
        ),
        (
            "rope_scaling",
            serde_json::json!({"type": "yarn", "factor": 4.0}),
            &["config.json", "rope_scaling", "not supported"],
        ),
    ];
    for (field, value, parts) in cases {
        let dir = scratch("tied_f32");
        let path = dir.path().join("config.json");
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        config[field] = value;
        std::fs::write(&path, config.to_string()).unwrap();
        assert_contains(&load_err(dir.path()), parts);
    }
}

/// Qwen2.5-0.5B-Instruct's published config.json (transformers 4.x layout).
const QWEN25_05B_CONFIG: &str = r#"{
  "architectures": ["Qwen2ForCausalLM"],
  "attention_dropout": 0.0,
  "bos_token_id": 151643,
  "eos_token_id": 151645,
  "hidden_act": "silu",
  "hidden_size": 896,
  "initializer_range": 0.02,
  "intermediate_size": 4864,
  "max_position_embeddings": 32768,
  "max_window_layers": 21,
  "model_type": "qwen2",
  "num_attention_heads": 14,
  "num_hidden_layers": 24,
  "num_key_value_heads": 2,
  "rms_norm_eps": 1e-06,
  "rope_theta": 1000000.0,
  "sliding_window": 32768,
  "tie_word_embeddings": true,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.43.1",
  "use_cache": true,
  "use_sliding_window": false,
  "vocab_size": 151936
}"#;

#[test]
fn real_qwen25_config_parses_and_round_trips() {
    let config = Qwen2Config::from_json_str(QWEN25_05B_CONFIG).unwrap();
    assert_eq!(config.head_dim(), 64);
    assert_eq!(config.rope_theta(), 1_000_000.0);
    assert_eq!(config.num_parameters(), 494_032_768);
    // use_sliding_window: false means full attention everywhere, whatever sliding_window says.
    for layer in 0..24 {
        assert_eq!(
            config.attention_kind(layer),
            qwen_model::AttentionKind::Full
        );
    }
    let again = Qwen2Config::from_json_str(&config.to_json_string()).unwrap();
    assert_eq!(config, again);
    let original: HashMap<String, serde_json::Value> =
        serde_json::from_str(QWEN25_05B_CONFIG).unwrap();
    let written: HashMap<String, serde_json::Value> =
        serde_json::from_str(&config.to_json_string()).unwrap();
    assert_eq!(
        original, written,
        "unknown fields must survive the round trip"
    );
}

/// Saves models the way `qwen-sft export` does (bf16, sharded with an index), one tied and one
/// untied, each with `ours.safetensors`: input ids and the logits this crate computes from the
/// saved files.
///
/// transformers must load those directories and produce the same logits. To check, run
///
/// ```text
/// QWEN_SFT_EXPORT_TO=/tmp/qwen-export cargo test -p qwen-model --test checkpoint_io exported_directory
/// python3 tests/fixtures/model/generate.py verify /tmp/qwen-export/tied_f32
/// python3 tests/fixtures/model/generate.py verify /tmp/qwen-export/untied_bf16
/// python3 tests/fixtures/model/generate.py verify /tmp/qwen-export/qwen3_tied_f32
/// ```
///
/// Last run (transformers 5.24.0): max |diff| 2.1e-6 (untied), 1.2e-6 (tied) and 1.5e-6 (Qwen3) over
/// `[1, 6, 151936]` logits.
#[test]
fn exported_directory_for_transformers() {
    let temp = tempfile::tempdir().unwrap();
    let root = std::env::var_os("QWEN_SFT_EXPORT_TO")
        .map_or_else(|| temp.path().to_path_buf(), Into::into);
    let ids: Vec<i64> = vec![151_644, 872, 198, 17, 10, 17];
    let input = || {
        Qwen2Input::new(Tensor::from_data(
            burn::tensor::TensorData::new(ids.clone(), [1, 6]),
            &device(),
        ))
    };
    for variant in ["tied_f32", "untied_bf16", "qwen3_tied_f32"] {
        let (config, model) =
            load_pretrained::<B>(fixture_dir(variant), &device(), DType::F32).unwrap();
        let dir = root.join(variant);
        let opts = SaveOptions {
            dtype: SaveDtype::Bf16,
            max_shard_bytes: 1_500_000,
        };
        save_pretrained(&model, &config, &dir, &opts).unwrap();
        assert!(dir.join("model.safetensors.index.json").exists());

        let (_, reloaded) = load_pretrained::<B>(&dir, &device(), DType::F32).unwrap();
        let logits = reloaded
            .forward(&input())
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        // bf16 storage of weights that were bf16 already changes nothing.
        if variant == "untied_bf16" {
            assert_eq!(
                logits,
                model.forward(&input()).into_data().to_vec::<f32>().unwrap()
            );
        }
        let logits_bytes: Vec<u8> = logits.iter().flat_map(|x| x.to_le_bytes()).collect();
        let id_bytes: Vec<u8> = ids.iter().flat_map(|x| x.to_le_bytes()).collect();
        let views = vec![
            (
                "input_ids",
                TensorView::new(Dtype::I64, vec![1, 6], &id_bytes).unwrap(),
            ),
            (
                "logits",
                TensorView::new(Dtype::F32, vec![1, 6, 151_936], &logits_bytes).unwrap(),
            ),
        ];
        safetensors::tensor::serialize_to_file(views, None, &dir.join("ours.safetensors")).unwrap();
    }
}

/// An f16 checkpoint loads, widened exactly to f32: its logits equal those of the same values
/// stored as f32.
#[test]
fn f16_checkpoint_loads() {
    let dir = scratch("tied_f32");
    let as_f16 = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), as_f16.path());
    rewrite(as_f16.path(), "model.safetensors", |tensors| {
        for (_, dtype, _, data) in tensors.iter_mut() {
            let halves: Vec<u8> = data
                .chunks_exact(4)
                .flat_map(|c| {
                    half::f16::from_f32(f32::from_le_bytes(c.try_into().unwrap())).to_le_bytes()
                })
                .collect();
            *dtype = Dtype::F16;
            *data = halves;
        }
    });
    // The same f16-rounded values, stored as f32.
    rewrite(dir.path(), "model.safetensors", |tensors| {
        for (_, _, _, data) in tensors.iter_mut() {
            *data = data
                .chunks_exact(4)
                .flat_map(|c| {
                    half::f16::from_f32(f32::from_le_bytes(c.try_into().unwrap()))
                        .to_f32()
                        .to_le_bytes()
                })
                .collect();
        }
    });
    let (_, from_f16) = load_pretrained::<B>(as_f16.path(), &device(), DType::F32).unwrap();
    let (_, from_f32) = load_pretrained::<B>(dir.path(), &device(), DType::F32).unwrap();
    assert_eq!(logits(&from_f16), logits(&from_f32));
}
