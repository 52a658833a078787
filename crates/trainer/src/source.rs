//! Where a run's model and tokenizer come from: a Hugging Face directory, or a size preset
//! initialised at random with the bundled Qwen2.5 tokenizer.

use std::path::{Path, PathBuf};

use burn::tensor::DType;
use burn::tensor::backend::Backend;
use qwen_chat::ChatTokenizer;
use qwen_model::{Qwen2Config, Qwen2ForCausalLM, SaveOptions, load_pretrained};

use crate::error::TrainError;

/// The files besides the weights that an exported model directory carries.
#[derive(Debug, Clone)]
pub struct TokenizerFiles {
    pub tokenizer_json: Vec<u8>,
    pub tokenizer_config_json: Option<Vec<u8>>,
    pub generation_config_json: Vec<u8>,
}

const AUX_FILES: [&str; 3] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
];

/// Qwen2.5-Instruct's `generation_config.json`, written for models initialised here.
pub const QWEN25_GENERATION_CONFIG: &str = r#"{
  "bos_token_id": 151643,
  "pad_token_id": 151643,
  "do_sample": true,
  "eos_token_id": [151645, 151643],
  "repetition_penalty": 1.05,
  "temperature": 0.7,
  "top_p": 0.8,
  "top_k": 20
}
"#;

impl TokenizerFiles {
    pub fn bundled() -> Self {
        Self {
            tokenizer_json: qwen_chat::bundled::TOKENIZER_JSON.to_vec(),
            tokenizer_config_json: Some(
                qwen_chat::bundled::TOKENIZER_CONFIG_JSON
                    .as_bytes()
                    .to_vec(),
            ),
            generation_config_json: QWEN25_GENERATION_CONFIG.as_bytes().to_vec(),
        }
    }

    /// Reads the files of a model directory; `generation_config.json` falls back to Qwen2.5's.
    pub fn from_dir(dir: &Path) -> Result<Self, TrainError> {
        let read = |name: &str| -> Result<Option<Vec<u8>>, TrainError> {
            let path = dir.join(name);
            match std::fs::read(&path) {
                Ok(bytes) => Ok(Some(bytes)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(source) => Err(TrainError::Io { path, source }),
            }
        };
        let tokenizer_json = read("tokenizer.json")?.ok_or_else(|| TrainError::Io {
            path: dir.join("tokenizer.json"),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "a model directory needs its tokenizer.json",
            ),
        })?;
        Ok(Self {
            tokenizer_json,
            tokenizer_config_json: read("tokenizer_config.json")?,
            generation_config_json: read("generation_config.json")?
                .unwrap_or_else(|| QWEN25_GENERATION_CONFIG.as_bytes().to_vec()),
        })
    }

    pub fn tokenizer(&self) -> Result<ChatTokenizer, TrainError> {
        Ok(ChatTokenizer::from_bytes(
            &self.tokenizer_json,
            self.tokenizer_config_json.as_deref(),
        )?)
    }

    /// Writes the three files into `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), TrainError> {
        let contents = [
            Some(&self.tokenizer_json),
            self.tokenizer_config_json.as_ref(),
            Some(&self.generation_config_json),
        ];
        for (name, bytes) in AUX_FILES.iter().zip(contents) {
            if let Some(bytes) = bytes {
                let path = dir.join(name);
                std::fs::write(&path, bytes).map_err(|source| TrainError::Io { path, source })?;
            }
        }
        Ok(())
    }
}

/// A model with its config and tokenizer files.
pub struct LoadedModel<B: Backend> {
    pub config: Qwen2Config,
    pub model: Qwen2ForCausalLM<B>,
    pub files: TokenizerFiles,
    /// The directory it came from, if any.
    pub dir: Option<PathBuf>,
}

/// Loads `dir`, with f32 parameters.
pub fn load_dir<B: Backend>(dir: &Path, device: &B::Device) -> Result<LoadedModel<B>, TrainError> {
    let files = TokenizerFiles::from_dir(dir)?;
    let (config, model) = load_pretrained::<B>(dir, device, DType::F32)?;
    Ok(LoadedModel {
        config,
        model,
        files,
        dir: Some(dir.to_path_buf()),
    })
}

/// Initialises `preset` at random.
/// The config of a size preset, or an error that lists the presets.
pub fn preset_config(preset: &str) -> Result<Qwen2Config, TrainError> {
    Qwen2Config::preset(preset).ok_or_else(|| TrainError::Config {
        path: PathBuf::from("model.preset"),
        reason: format!(
            "unknown preset `{preset}`; use one of {:?}",
            Qwen2Config::PRESETS
        ),
    })
}

pub fn init_preset<B: Backend>(
    preset: &str,
    seed: u64,
    device: &B::Device,
) -> Result<LoadedModel<B>, TrainError> {
    let config = preset_config(preset)?;
    let model = Qwen2ForCausalLM::init(&config, device, seed);
    Ok(LoadedModel {
        config,
        model,
        files: TokenizerFiles::bundled(),
        dir: None,
    })
}

/// Writes a complete Hugging Face model directory: weights, `config.json`, tokenizer files and
/// `generation_config.json`.
pub fn export<B: Backend>(
    loaded: &LoadedModel<B>,
    dir: &Path,
    opts: &SaveOptions,
) -> Result<(), TrainError> {
    qwen_model::save_pretrained(&loaded.model, &loaded.config, dir, opts)?;
    loaded.files.write(dir)
}
