//! Optimizers with transformers' semantics, global-norm clipping, and their saved state.
//!
//! burn's own optimizers differ from what SFT users expect (AdamW's eps 1e-5 and weight decay
//! 1e-4 by default, clipping per tensor, one decay for every parameter), so the update is
//! written here, in f32, keyed by parameter name so that a checkpoint restores it into a freshly
//! loaded model.

use std::collections::HashMap;
use std::path::Path;

use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Tensor, TensorData};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

use crate::error::TrainError;

/// Which optimizer, with its hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "lowercase", deny_unknown_fields)]
pub enum OptimizerConfig {
    /// `torch.optim.AdamW` with transformers' defaults.
    Adamw {
        #[serde(default = "default_beta1")]
        beta1: f64,
        #[serde(default = "default_beta2")]
        beta2: f64,
        #[serde(default = "default_eps")]
        eps: f64,
        /// Decoupled weight decay; never applied to biases and norm weights.
        #[serde(default)]
        weight_decay: f64,
    },
    /// Plain `torch.optim.SGD`, as in the classic Qwen SFT walk-through.
    Sgd {
        #[serde(default)]
        momentum: f64,
    },
}

fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.999
}
fn default_eps() -> f64 {
    1e-8
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self::Adamw {
            beta1: default_beta1(),
            beta2: default_beta2(),
            eps: default_eps(),
            weight_decay: 0.0,
        }
    }
}

/// transformers' `get_decay_parameter_names`: biases and normalisation weights are not decayed.
pub fn decays(name: &str) -> bool {
    let mut parts = name.split('.');
    let is_bias = name.rsplit('.').next() == Some("bias");
    !(is_bias || parts.any(|part| part.contains("norm")))
}

/// Moment buffers of one parameter, flattened.
#[derive(Debug, Clone)]
struct Moments<B: Backend> {
    first: Tensor<B, 1>,
    second: Option<Tensor<B, 1>>,
}

/// The optimizer and its state: one entry per parameter name, plus the step count.
pub struct Optimizer<B: Backend> {
    config: OptimizerConfig,
    step: u64,
    state: HashMap<String, Moments<B>>,
}

impl<B: Backend> Optimizer<B> {
    pub fn new(config: OptimizerConfig) -> Self {
        Self {
            config,
            step: 0,
            state: HashMap::new(),
        }
    }

    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// Applies one update: every gradient is scaled by `grad_scale` where there is one (the
    /// clipping factor, a `[1]` tensor on the device, see [`clip_scale`]), then each parameter
    /// moves by the optimizer's rule at learning rate `lr`. Reads nothing back from the device.
    pub fn step<AB, M>(
        &mut self,
        model: M,
        grads: &mut GradientsParams,
        lr: f64,
        grad_scale: Option<Tensor<B, 1>>,
    ) -> M
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        self.step += 1;
        let mut update = Update::<AB> {
            optimizer: self,
            grads,
            lr,
            grad_scale,
            path: Vec::new(),
        };
        model.map(&mut update)
    }

    /// Writes the moments to `path` (safetensors, f32, keyed `<param>.exp_avg[_sq]`).
    pub fn save(&self, path: &Path) -> Result<(), TrainError> {
        let mut entries: Vec<(String, Vec<u8>, usize)> = Vec::new();
        for (name, moments) in &self.state {
            let mut push = |suffix: &str, t: &Tensor<B, 1>| {
                let data = t.clone().into_data().convert_dtype(DType::F32);
                let len = data.num_elements();
                entries.push((format!("{name}.{suffix}"), data.as_bytes().to_vec(), len));
            };
            push("exp_avg", &moments.first);
            if let Some(second) = &moments.second {
                push("exp_avg_sq", second);
            }
        }
        let views = entries
            .iter()
            .map(|(name, bytes, len)| {
                (
                    name.clone(),
                    TensorView::new(Dtype::F32, vec![*len], bytes).expect("sizes agree"),
                )
            })
            .collect::<Vec<_>>();
        let metadata = HashMap::from([
            ("step".to_string(), self.step.to_string()),
            (
                "optimizer".to_string(),
                serde_json::to_string(&self.config).expect("json"),
            ),
        ]);
        safetensors::tensor::serialize_to_file(views, Some(metadata), path).map_err(|err| {
            TrainError::Checkpoint {
                path: path.to_path_buf(),
                reason: err.to_string(),
            }
        })
    }

    /// Restores moments and step count written by [`Optimizer::save`].
    pub fn load(
        config: OptimizerConfig,
        path: &Path,
        device: &B::Device,
    ) -> Result<Self, TrainError> {
        let broken = |reason: String| TrainError::Checkpoint {
            path: path.to_path_buf(),
            reason,
        };
        let bytes = std::fs::read(path).map_err(|e| broken(e.to_string()))?;
        let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| broken(e.to_string()))?;
        let step = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get("step"))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| broken("no `step` in the metadata".into()))?;
        let file = SafeTensors::deserialize(&bytes).map_err(|e| broken(e.to_string()))?;
        let mut state: HashMap<String, Moments<B>> = HashMap::new();
        for (key, view) in file.iter() {
            let (name, suffix) = key
                .rsplit_once('.')
                .ok_or_else(|| broken(format!("bad key `{key}`")))?;
            let data =
                TensorData::from_bytes_vec(view.data().to_vec(), view.shape().to_vec(), DType::F32);
            let tensor = Tensor::<B, 1>::from_data(data, device);
            let entry = state.entry(name.to_string()).or_insert_with(|| Moments {
                first: tensor.clone(),
                second: None,
            });
            match suffix {
                "exp_avg" => entry.first = tensor,
                "exp_avg_sq" => entry.second = Some(tensor),
                other => return Err(broken(format!("unknown moment `{other}` for `{name}`"))),
            }
        }
        Ok(Self {
            config,
            step,
            state,
        })
    }
}

/// The update as a module mapper, so every parameter is visited with its name.
struct Update<'a, AB: AutodiffBackend> {
    optimizer: &'a mut Optimizer<AB::InnerBackend>,
    grads: &'a mut GradientsParams,
    lr: f64,
    grad_scale: Option<Tensor<AB::InnerBackend, 1>>,
    path: Vec<String>,
}

impl<AB: AutodiffBackend> ModuleMapper<AB> for Update<'_, AB> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<AB, D>>) -> Param<Tensor<AB, D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(grad) = self.grads.remove::<AB::InnerBackend, D>(id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let name = self.path.join(".");
        let shape = tensor.dims();
        let value = tensor.inner();
        let dtype = value.dtype();
        // [numel]
        let flat = value.flatten::<1>(0, D - 1).cast(DType::F32);
        let grad = grad.flatten::<1>(0, D - 1).cast(DType::F32);
        // [numel] * [1]
        let grad = match &self.grad_scale {
            Some(scale) => grad * scale.clone(),
            None => grad,
        };
        let updated = self
            .optimizer
            .update(&name, flat, grad, self.lr)
            .cast(dtype)
            .reshape(shape);
        let updated = Tensor::from_inner(updated).require_grad();
        Param::from_mapped_value(id, updated, mapper)
    }
}

impl<B: Backend> Optimizer<B> {
    /// One parameter's update, in f32 on flattened tensors.
    fn update(
        &mut self,
        name: &str,
        param: Tensor<B, 1>,
        grad: Tensor<B, 1>,
        lr: f64,
    ) -> Tensor<B, 1> {
        let t = self.step as i32;
        match self.config {
            OptimizerConfig::Sgd { momentum } => {
                if momentum == 0.0 {
                    return param - grad.mul_scalar(lr);
                }
                // torch: buf = momentum * buf + grad (the first step takes grad as is).
                let buf = match self.state.remove(name) {
                    Some(m) => m.first.mul_scalar(momentum) + grad,
                    None => grad,
                };
                self.state.insert(
                    name.to_string(),
                    Moments {
                        first: buf.clone(),
                        second: None,
                    },
                );
                param - buf.mul_scalar(lr)
            }
            OptimizerConfig::Adamw {
                beta1,
                beta2,
                eps,
                weight_decay,
            } => {
                let (m, v) = match self.state.remove(name) {
                    Some(Moments {
                        first,
                        second: Some(second),
                    }) => (first, second),
                    _ => (grad.zeros_like(), grad.zeros_like()),
                };
                let m = m.mul_scalar(beta1) + grad.clone().mul_scalar(1.0 - beta1);
                let v = v.mul_scalar(beta2) + grad.square().mul_scalar(1.0 - beta2);
                let bias1 = 1.0 - beta1.powi(t);
                let bias2 = 1.0 - beta2.powi(t);
                // torch.optim.AdamW: decay first, then the Adam step.
                let param = if weight_decay != 0.0 && decays(name) {
                    param.mul_scalar(1.0 - lr * weight_decay)
                } else {
                    param
                };
                let denom = v.clone().sqrt().div_scalar(bias2.sqrt()).add_scalar(eps);
                let param = param - m.clone().div(denom).mul_scalar(lr / bias1);
                self.state.insert(
                    name.to_string(),
                    Moments {
                        first: m,
                        second: Some(v),
                    },
                );
                param
            }
        }
    }
}

/// The L2 norm of all gradients together, as `torch.nn.utils.clip_grad_norm_` computes it:
/// `[1]`, f32, left on the device (`None` when no parameter has a gradient).
pub fn global_grad_norm<AB: AutodiffBackend, M: AutodiffModule<AB>>(
    model: &M,
    grads: &GradientsParams,
) -> Option<Tensor<AB::InnerBackend, 1>> {
    struct SumSquares<'a, AB: AutodiffBackend> {
        grads: &'a GradientsParams,
        total: Option<Tensor<AB::InnerBackend, 1>>,
    }
    impl<AB: AutodiffBackend> ModuleVisitor<AB> for SumSquares<'_, AB> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
            if let Some(grad) = self.grads.get::<AB::InnerBackend, D>(param.id) {
                let sq = grad.cast(DType::F32).square().sum();
                self.total = Some(match self.total.take() {
                    Some(total) => total + sq,
                    None => sq,
                });
            }
        }
    }
    let mut visitor = SumSquares::<AB> { grads, total: None };
    model.visit(&mut visitor);
    visitor.total.map(Tensor::sqrt)
}

/// The factor clipping multiplies every gradient by, computed on the device from the `[1]`
/// norm: torch's `clamp(max_norm / (norm + 1e-6), max=1)`. `None` when `max_norm` is 0
/// (clipping off), so that no multiplication is queued at all.
pub fn clip_scale<B: Backend>(norm: Tensor<B, 1>, max_norm: f64) -> Option<Tensor<B, 1>> {
    (max_norm > 0.0).then(|| {
        norm.add_scalar(1e-6)
            .recip()
            .mul_scalar(max_norm)
            .clamp_max(1.0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::ElementConversion;
    use burn::backend::{Autodiff, Flex};
    use burn::module::Module;

    type AB = Autodiff<Flex>;

    #[derive(Module, Debug)]
    struct Toy<B: Backend> {
        weight: Param<Tensor<B, 1>>,
        bias: Param<Tensor<B, 1>>,
    }

    fn toy() -> Toy<AB> {
        let device = Default::default();
        let start = || Param::from_tensor(Tensor::<AB, 1>::from_floats([0.5, -1.0, 2.0], &device));
        Toy {
            weight: start(),
            bias: start(),
        }
    }

    /// Two steps with the gradients `[0.1, -0.2, 0.3]` then `[-0.05, 0.4, 0.0]`.
    fn two_steps(config: OptimizerConfig, lr: f64) -> Toy<AB> {
        let mut model = toy();
        let mut optimizer = Optimizer::<Flex>::new(config);
        for g in [[0.1f32, -0.2, 0.3], [-0.05, 0.4, 0.0]] {
            let mut grads = GradientsParams::new();
            for id in [model.weight.id, model.bias.id] {
                grads.register::<Flex, 1>(id, Tensor::from_floats(g, &Default::default()));
            }
            model = optimizer.step(model, &mut grads, lr, None);
        }
        model
    }

    fn values(p: &Param<Tensor<AB, 1>>) -> Vec<f32> {
        p.val().into_data().to_vec().unwrap()
    }

    fn assert_close(ours: &[f32], torch: &[f32]) {
        for (a, b) in ours.iter().zip(torch) {
            assert!((a - b).abs() < 1e-6, "{ours:?} vs torch {torch:?}");
        }
    }

    /// Expected values: `torch.optim.AdamW(lr=0.01, weight_decay=0.1)` and `SGD(lr=0.1,
    /// momentum=0.9)` on the same parameters and gradients (torch 2.15).
    #[test]
    fn adamw_matches_torch_and_spares_biases_from_decay() {
        let config = OptimizerConfig::Adamw {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let model = two_steps(config, 0.01);
        assert_close(
            &values(&model.weight),
            &[0.486_347_14, -0.991_672_1, 1.979_311_5],
        );
        // The bias gets the update of weight_decay = 0.
        assert_close(
            &values(&model.bias),
            &[0.487_336_64, -0.993_661_05, 1.983_299_4],
        );
    }

    #[test]
    fn sgd_with_momentum_matches_torch() {
        let model = two_steps(OptimizerConfig::Sgd { momentum: 0.9 }, 0.1);
        assert_close(&values(&model.weight), &[0.486, -1.002, 1.943]);
    }

    /// The clipping factor scales every gradient before the rule: SGD with the factor 0.5 moves
    /// a parameter as far as SGD on halved gradients.
    #[test]
    fn the_clip_factor_scales_the_gradients() {
        let device = Default::default();
        let run = |grad: [f32; 3], scale: Option<f32>| {
            let model = toy();
            let mut optimizer = Optimizer::<Flex>::new(OptimizerConfig::Sgd { momentum: 0.0 });
            let mut grads = GradientsParams::new();
            grads.register::<Flex, 1>(model.weight.id, Tensor::from_floats(grad, &device));
            let scale = scale.map(|s| Tensor::<Flex, 1>::from_floats([s], &device));
            values(&optimizer.step(model, &mut grads, 0.1, scale).weight)
        };
        let clipped = run([0.2, -0.4, 0.6], Some(0.5));
        assert_eq!(clipped, run([0.1, -0.2, 0.3], None));
        assert_ne!(clipped, run([0.2, -0.4, 0.6], None));
    }

    #[test]
    fn optimizer_state_round_trips() {
        let config = OptimizerConfig::default();
        let mut model = toy();
        let mut optimizer = Optimizer::<Flex>::new(config);
        let mut grads = GradientsParams::new();
        grads.register::<Flex, 1>(
            model.weight.id,
            Tensor::from_floats([0.1f32, -0.2, 0.3], &Default::default()),
        );
        model = optimizer.step(model, &mut grads, 0.01, None);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("optimizer.safetensors");
        optimizer.save(&path).unwrap();
        let loaded = Optimizer::<Flex>::load(config, &path, &Default::default()).unwrap();
        assert_eq!(loaded.steps_taken(), 1);
        let (a, b) = (&optimizer.state["weight"], &loaded.state["weight"]);
        assert_eq!(a.first.to_data(), b.first.to_data());
        assert_eq!(
            a.second.as_ref().unwrap().to_data(),
            b.second.as_ref().unwrap().to_data()
        );
        drop(model);
    }

    #[test]
    fn global_norm_and_clip_follow_torch() {
        let model = toy();
        let mut grads = GradientsParams::new();
        grads.register::<Flex, 1>(
            model.weight.id,
            Tensor::from_floats([3.0f32, 0.0, 0.0], &Default::default()),
        );
        grads.register::<Flex, 1>(
            model.bias.id,
            Tensor::from_floats([0.0f32, 4.0, 0.0], &Default::default()),
        );
        let norm = global_grad_norm(&model, &grads).expect("two gradients");
        let read = |t: Tensor<Flex, 1>| t.into_scalar().elem::<f64>();
        assert_eq!(read(norm.clone()), 5.0);
        let scale = read(clip_scale(norm.clone(), 1.0).unwrap());
        assert!((scale - 1.0 / (5.0 + 1e-6)).abs() < 1e-7, "{scale}");
        // torch clamps the factor at 1, so a norm under max_norm leaves the gradients as they are
        assert_eq!(read(clip_scale(norm.clone(), 10.0).unwrap()), 1.0);
        assert!(clip_scale(norm, 0.0).is_none());
        assert!(global_grad_norm(&model, &GradientsParams::new()).is_none());
    }

    #[test]
    fn no_decay_on_biases_and_norms() {
        assert!(decays("model.layers.0.self_attn.q_proj.weight"));
        assert!(decays("model.embed_tokens.weight"));
        assert!(!decays("model.layers.0.self_attn.q_proj.bias"));
        assert!(!decays("model.layers.3.input_layernorm.weight"));
        assert!(!decays("model.layers.3.post_attention_layernorm.weight"));
        assert!(!decays("model.norm.weight"));
    }
}
