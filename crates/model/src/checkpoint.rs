//! Hugging Face model directories: `config.json` plus `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`.
//!
//! Loading is strict: every tensor in the checkpoint is used, every parameter is filled, and the
//! first problem is an error naming the file and the key. No partially loaded model is ever
//! returned.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::config::Qwen2Config;
use crate::error::{LoadError, SaveError};
use crate::model::Qwen2ForCausalLM;
use crate::weights::{Init, WeightSource, Weights};

const SINGLE_FILE: &str = "model.safetensors";
const INDEX_FILE: &str = "model.safetensors.index.json";
const CONFIG_FILE: &str = "config.json";
const TIED_HEAD: &str = "lm_head.weight";
const EMBEDDING: &str = "model.embed_tokens.weight";

/// Loads `config.json` and the weights of the model directory `dir` onto `device`.
///
/// Tensors stored as F32, BF16 or F16 are converted to `dtype`, the dtype of the parameters
/// (F32 for training with f32 master weights).
pub fn load_pretrained<B: Backend>(
    dir: impl AsRef<Path>,
    device: &B::Device,
    dtype: DType,
) -> Result<(Qwen2Config, Qwen2ForCausalLM<B>), LoadError> {
    let dir = dir.as_ref();
    let config = Qwen2Config::from_file(dir.join(CONFIG_FILE))?;
    let mut source = CheckpointSource::open(dir)?;
    if config.tie_word_embeddings {
        source.accept_redundant_tied_head()?;
    }
    let model = Qwen2ForCausalLM::new(&config, &mut Weights::new(&mut source, device, dtype))?;
    source.finish()?;
    Ok((config, model))
}

/// The tensors of a checkpoint, read into host memory and handed out once each.
pub struct CheckpointSource {
    dir: PathBuf,
    /// name -> (data, the file it came from)
    tensors: HashMap<String, (TensorData, PathBuf)>,
}

impl CheckpointSource {
    /// Reads every tensor of the checkpoint in `dir`, checking the index against the shards.
    pub fn open(dir: &Path) -> Result<Self, LoadError> {
        let single = dir.join(SINGLE_FILE);
        let index = dir.join(INDEX_FILE);
        let mut tensors = HashMap::new();
        if index.exists() {
            let weight_map = read_index(&index)?;
            // Shards in a stable order; each is read once.
            let mut shards: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
            for (name, shard) in &weight_map {
                shards
                    .entry(shard.as_str())
                    .or_default()
                    .push(name.as_str());
            }
            for (shard, names) in shards {
                if shard.contains('/') || shard.contains('\\') || shard.starts_with('.') {
                    return Err(LoadError::Index {
                        path: index.clone(),
                        reason: format!("shard name `{shard}` is not a plain file name"),
                    });
                }
                let path = dir.join(shard);
                let bytes = read_file(&path)?;
                let file = parse_safetensors(&path, &bytes)?;
                for (name, view) in file.iter() {
                    match weight_map.get(name) {
                        Some(indexed) if indexed == shard => {}
                        other => {
                            return Err(LoadError::NotInIndex {
                                path: index.clone(),
                                name: name.to_string(),
                                shard: shard.to_string(),
                                indexed: other.map_or("nothing".to_string(), |s| s.clone()),
                            });
                        }
                    }
                    tensors.insert(
                        name.to_string(),
                        (to_tensor_data(&path, name, &view)?, path.clone()),
                    );
                }
                for name in names {
                    if !tensors.contains_key(name) {
                        return Err(LoadError::MissingFromShard {
                            path: index.clone(),
                            name: name.to_string(),
                            shard: shard.to_string(),
                        });
                    }
                }
            }
        } else if single.exists() {
            let bytes = read_file(&single)?;
            let file = parse_safetensors(&single, &bytes)?;
            for (name, view) in file.iter() {
                tensors.insert(
                    name.to_string(),
                    (to_tensor_data(&single, name, &view)?, single.clone()),
                );
            }
        } else {
            return Err(LoadError::NoWeights {
                path: dir.to_path_buf(),
            });
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            tensors,
        })
    }

    /// A tied checkpoint may also carry `lm_head.weight`. It is accepted only as an exact copy of
    /// the embedding, so that nothing the model would not use is dropped unnoticed.
    fn accept_redundant_tied_head(&mut self) -> Result<(), LoadError> {
        let Some((head, path)) = self.tensors.get(TIED_HEAD) else {
            return Ok(());
        };
        let same = self
            .tensors
            .get(EMBEDDING)
            .is_some_and(|(embedding, _)| embedding == head);
        if !same {
            return Err(LoadError::TiedMismatch { path: path.clone() });
        }
        self.tensors.remove(TIED_HEAD);
        Ok(())
    }

    /// Fails if the checkpoint holds a tensor the model did not ask for.
    fn finish(self) -> Result<(), LoadError> {
        let mut left: Vec<_> = self.tensors.into_iter().collect();
        left.sort_by(|a, b| a.0.cmp(&b.0));
        match left.into_iter().next() {
            Some((name, (_, path))) => Err(LoadError::UnexpectedTensor { path, name }),
            None => Ok(()),
        }
    }
}

impl WeightSource for CheckpointSource {
    fn tensor(
        &mut self,
        name: &str,
        shape: &[usize],
        _init: Init,
    ) -> Result<TensorData, LoadError> {
        let (data, path) = self
            .tensors
            .remove(name)
            .ok_or_else(|| LoadError::MissingTensor {
                path: self.dir.clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
            })?;
        if data.shape.as_slice() != shape {
            return Err(LoadError::ShapeMismatch {
                path,
                name: name.to_string(),
                expected: shape.to_vec(),
                found: data.shape.to_vec(),
            });
        }
        Ok(data)
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, LoadError> {
    std::fs::read(path).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn parse_safetensors<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>, LoadError> {
    SafeTensors::deserialize(bytes).map_err(|err| LoadError::Safetensors {
        path: path.to_path_buf(),
        reason: err.to_string(),
    })
}

/// `weight_map` of an index file: tensor name -> shard file name.
fn read_index(path: &Path) -> Result<BTreeMap<String, String>, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let broken = |reason: String| LoadError::Index {
        path: path.to_path_buf(),
        reason,
    };
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|err| broken(err.to_string()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| broken("no `weight_map` object".into()))?;
    map.iter()
        .map(|(name, file)| match file.as_str() {
            Some(file) => Ok((name.clone(), file.to_string())),
            None => Err(broken(format!("`weight_map.{name}` is not a string"))),
        })
        .collect()
}

fn to_tensor_data(path: &Path, name: &str, view: &TensorView<'_>) -> Result<TensorData, LoadError> {
    let dtype = match view.dtype() {
        Dtype::F32 => DType::F32,
        Dtype::BF16 => DType::BF16,
        Dtype::F16 => DType::F16,
        other => {
            return Err(LoadError::UnsupportedDtype {
                path: path.to_path_buf(),
                name: name.to_string(),
                dtype: format!("{other:?}"),
            });
        }
    };
    Ok(TensorData::from_bytes_vec(
        view.data().to_vec(),
        view.shape().to_vec(),
        dtype,
    ))
}

/// The dtype tensors are written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SaveDtype {
    F32,
    #[default]
    Bf16,
    F16,
}

impl SaveDtype {
    fn burn(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
        }
    }

    fn safetensors(self) -> Dtype {
        match self {
            Self::F32 => Dtype::F32,
            Self::Bf16 => Dtype::BF16,
            Self::F16 => Dtype::F16,
        }
    }

    /// The name transformers writes as `torch_dtype`.
    pub fn torch_name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::Bf16 => "bfloat16",
            Self::F16 => "float16",
        }
    }
}

impl std::str::FromStr for SaveDtype {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "f16" | "float16" => Ok(Self::F16),
            other => Err(format!("unknown dtype `{other}`; use f32, bf16 or f16")),
        }
    }
}

/// How [`save_pretrained`] writes a model.
#[derive(Debug, Clone, Copy)]
pub struct SaveOptions {
    pub dtype: SaveDtype,
    /// Shards are cut so that none exceeds this many bytes of tensor data (a single tensor
    /// larger than this gets a shard of its own). transformers' default is 5 GB.
    pub max_shard_bytes: u64,
}

impl Default for SaveOptions {
    fn default() -> Self {
        Self {
            dtype: SaveDtype::Bf16,
            max_shard_bytes: 5_000_000_000,
        }
    }
}

/// Every parameter of `module` with its dotted module path, which for the model is its Hugging
/// Face name.
pub fn named_parameters<B: Backend, M: Module<B>>(
    module: &M,
) -> Vec<(String, Tensor<B, 1>, Vec<usize>)> {
    struct Collect<B: Backend> {
        path: Vec<String>,
        out: Vec<(String, Tensor<B, 1>, Vec<usize>)>,
    }
    impl<B: Backend> ModuleVisitor<B> for Collect<B> {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let tensor = param.val();
            let shape = tensor.dims().to_vec();
            self.out
                .push((self.path.join("."), tensor.flatten(0, D - 1), shape));
        }
    }
    let mut collect = Collect {
        path: Vec::new(),
        out: Vec::new(),
    };
    module.visit(&mut collect);
    collect.out
}

/// Writes `model` and `config` to `dir` as a Hugging Face model directory: HF tensor names and
/// shapes, `opts.dtype`, shards with an index above `opts.max_shard_bytes`, and `config.json`.
/// A tied model is written with `model.embed_tokens.weight` only, as transformers expects.
/// Every file is written to a temporary name first and renamed into place.
pub fn save_pretrained<B: Backend>(
    model: &Qwen2ForCausalLM<B>,
    config: &Qwen2Config,
    dir: impl AsRef<Path>,
    opts: &SaveOptions,
) -> Result<(), SaveError> {
    let dir = dir.as_ref();
    std::fs::create_dir_all(dir).map_err(|source| SaveError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let dtype = opts.dtype.burn();
    let tensors: Vec<(String, Vec<usize>, TensorData)> = named_parameters(model)
        .into_iter()
        .map(|(name, tensor, shape)| {
            let data = tensor.into_data().convert_dtype(dtype);
            (name, shape, data)
        })
        .collect();

    // Greedy shards in parameter order.
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut shard_bytes = 0u64;
    for (i, (_, _, data)) in tensors.iter().enumerate() {
        let bytes = data.as_bytes().len() as u64;
        if shard_bytes > 0 && shard_bytes + bytes > opts.max_shard_bytes {
            shards.push(Vec::new());
            shard_bytes = 0;
        }
        shards.last_mut().expect("never empty").push(i);
        shard_bytes += bytes;
    }

    let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    let total_size: u64 = tensors
        .iter()
        .map(|(_, _, d)| d.as_bytes().len() as u64)
        .sum();
    // Remove files of an earlier save in another layout, so the directory is unambiguous.
    for stale in [SINGLE_FILE, INDEX_FILE] {
        let _ = std::fs::remove_file(dir.join(stale));
    }
    for (k, members) in shards.iter().enumerate() {
        let file_name = if n == 1 {
            SINGLE_FILE.to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", k + 1, n)
        };
        let views = members
            .iter()
            .map(|&i| {
                let (name, shape, data) = &tensors[i];
                weight_map.insert(name.clone(), file_name.clone());
                TensorView::new(opts.dtype.safetensors(), shape.clone(), data.as_bytes())
                    .map(|view| (name.clone(), view))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| SaveError::Serialize {
                path: dir.join(&file_name),
                reason: err.to_string(),
            })?;
        write_atomic(&dir.join(&file_name), |tmp| {
            safetensors::tensor::serialize_to_file(views, metadata.clone(), tmp)
                .map_err(|err| err.to_string())
        })?;
    }
    if n > 1 {
        let index = serde_json::json!({
            "metadata": { "total_size": total_size },
            "weight_map": weight_map,
        });
        let text = serde_json::to_string_pretty(&index).expect("json");
        write_atomic(&dir.join(INDEX_FILE), |tmp| {
            std::fs::write(tmp, text).map_err(|e| e.to_string())
        })?;
    }

    let mut config = config.clone();
    config.torch_dtype = Some(opts.dtype.torch_name().to_string());
    let text = config.to_json_string();
    write_atomic(&dir.join(CONFIG_FILE), |tmp| {
        std::fs::write(tmp, text).map_err(|e| e.to_string())
    })?;
    Ok(())
}

/// Writes through `write` to `path.tmp`, then renames it to `path`, so a reader never sees a
/// half-written file.
pub(crate) fn write_atomic(
    path: &Path,
    write: impl FnOnce(&Path) -> Result<(), String>,
) -> Result<(), SaveError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    write(&tmp).map_err(|reason| SaveError::Serialize {
        path: path.to_path_buf(),
        reason,
    })?;
    std::fs::rename(&tmp, path).map_err(|source| SaveError::Io {
        path: path.to_path_buf(),
        source,
    })
}
