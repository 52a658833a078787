//! Optimizers with transformers' semantics, global-norm clipping, and their saved state.
//!
//! burn's own optimizers differ from what SFT users expect (AdamW's eps 1e-5 and weight decay
//! 1e-4 by default, clipping per tensor, one decay for every parameter), so the update is
//! written here, in f32, keyed by parameter name so that a checkpoint restores it into a freshly
//! loaded model.

use std::collections::HashMap;
use std::path::Path;

use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

use crate::error::TrainError;
use crate::fused_adamw::tensor_ops::adamw_rule;
use crate::fused_adamw::{AdamwGroup, AdamwStep, OptimizerBackend};

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

/// One parameter's range in a step's flat buffers.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Slot {
    name: String,
    offset: usize,
    numel: usize,
}

/// The moments of one group of the last step's parameters, end to end in one buffer each, in
/// the order of `slots`.
#[derive(Debug, Clone)]
struct FlatMoments<B: Backend> {
    slots: Vec<Slot>,
    moments: Moments<B>,
}

/// About how many values a group of the update holds (512 MiB per f32 buffer). Parameters are
/// stepped a group at a time, so that the step's own buffers (the clipped gradient, the new
/// moments, the step itself) exist for one group, not for the whole model: for the whole
/// 1.5b preset they were some 25 GiB at once (docs/BENCHMARKS.md). A parameter larger than
/// this is a group of its own.
const GROUP_VALUES: usize = 1 << 27;

/// Consecutive runs of `sizes` of at most `limit` values each (one item may exceed it alone),
/// as index ranges.
fn group_ranges(sizes: &[usize], limit: usize) -> Vec<std::ops::Range<usize>> {
    let mut ranges = Vec::new();
    let (mut start, mut values) = (0, 0);
    for (i, &n) in sizes.iter().enumerate() {
        if i > start && values + n > limit {
            ranges.push(start..i);
            (start, values) = (i, 0);
        }
        values += n;
    }
    if start < sizes.len() {
        ranges.push(start..sizes.len());
    }
    ranges
}

/// The optimizer and its state: every parameter's moments, plus the step count.
///
/// A step works on flat buffers, one per group of parameters (`GROUP_VALUES`): each group's
/// gradients are copied end to end into one f32 buffer, the global norm sums one reduction per
/// group, and the rule (clip, moments, the step size) runs over a group at once, leaving one
/// subtraction per parameter. Written per parameter, the same update took about seven kernels
/// per parameter tensor (norm, clip, moments, update), some 2,000 a step for the 0.5b preset's
/// 291 tensors (docs/BENCHMARKS.md).
pub struct Optimizer<B: Backend> {
    config: OptimizerConfig,
    step: u64,
    /// The moments of the last step's parameters, group by group.
    flat: Vec<FlatMoments<B>>,
    /// [`GROUP_VALUES`], smaller in tests.
    group_values: usize,
    /// The moments of parameters outside `flat`: loaded from a checkpoint and not stepped
    /// since, or without a gradient in the last step (kept, as torch keeps them).
    parked: HashMap<String, Moments<B>>,
    /// Whether AdamW's kernels also write the parameters' bf16 copies for a model that
    /// computes in bf16 ([`keep_bf16_copies`](Self::keep_bf16_copies)).
    bf16_copies: bool,
    /// Tests: AdamW through [`OptimizerBackend`] even where the backend has no kernels (its
    /// tensor-op bodies then run), to check that path against the flat one.
    #[cfg(test)]
    backend_path: bool,
}

impl<B: OptimizerBackend> Optimizer<B> {
    /// One optimizer step: the parameters with a gradient in `grads` (the others are left as
    /// they are) move by the optimizer's rule at learning rate `lr`, after clipping the
    /// gradients to a global norm of `max_grad_norm` (0: no clipping) as
    /// `torch.nn.utils.clip_grad_norm_` does. Returns the model and the pre-clip global norm,
    /// a `[1]` f32 tensor left on the device (`None` when no parameter had a gradient): the
    /// step reads nothing back.
    ///
    /// AdamW over f32 parameters runs through the backend's [`OptimizerBackend`] where it has
    /// kernels for it; everything else runs the flat tensor-op path.
    pub fn step<AB, M>(
        &mut self,
        model: M,
        grads: &mut GradientsParams,
        lr: f64,
        max_grad_norm: f64,
    ) -> (M, Option<Tensor<B, 1>>)
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        self.step += 1;
        let adamw = match self.config {
            OptimizerConfig::Adamw {
                beta1,
                beta2,
                eps,
                weight_decay,
            } => Some(AdamwStep {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
                step: self.step,
                max_grad_norm,
                bf16_copies: self.bf16_copies,
            }),
            OptimizerConfig::Sgd { .. } => None,
        };
        #[cfg(test)]
        let backend_path = self.backend_path;
        #[cfg(not(test))]
        let backend_path = false;
        let by_backend = adamw.filter(|_| B::has_adamw_kernels() || backend_path);
        let mut gather = Gather::<AB> {
            grads,
            path: Vec::new(),
            params: Vec::new(),
            parts: Vec::new(),
            values: by_backend.map(|_| Vec::new()),
        };
        model.visit(&mut gather);
        let Gather {
            params,
            parts,
            values,
            ..
        } = gather;
        if parts.is_empty() {
            return (model, None);
        }
        match (by_backend, values) {
            (Some(adamw), Some(values)) if values.iter().all(|v| v.dtype() == DType::F32) => {
                self.step_by_backend(model, params, parts, values, adamw)
            }
            _ => self.step_flat(model, params, parts, lr, max_grad_norm, adamw),
        }
    }

    /// AdamW through [`OptimizerBackend`]: the global norm of every gradient, then each group
    /// of parameters stepped against its flat moments; new values replace the parameters.
    fn step_by_backend<AB, M>(
        &mut self,
        model: M,
        params: Vec<Stepped>,
        grads: Vec<Tensor<B, 1>>,
        values: Vec<Tensor<B, 1>>,
        adamw: AdamwStep,
    ) -> (M, Option<Tensor<B, 1>>)
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        let grads: Vec<_> = grads
            .into_iter()
            .map(|g| g.into_primitive().tensor())
            .collect();
        let norm = B::grad_norm(grads.clone());
        let (ranges, groups) = self.groups(&params);
        let norm = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(norm));
        let moments = self.moments_for(&groups, &norm.device());
        let (mut grads, mut values) = (grads.into_iter(), values.into_iter());
        let mut model = model;
        for ((range, slots), moments) in ranges.into_iter().zip(groups).zip(moments) {
            let Some(Moments {
                first,
                second: Some(second),
            }) = moments
            else {
                unreachable!("AdamW always has both moments")
            };
            let group = AdamwGroup {
                values: values
                    .by_ref()
                    .take(range.len())
                    .map(|v| v.into_primitive().tensor())
                    .collect(),
                grads: grads.by_ref().take(range.len()).collect(),
                decays: params[range.clone()].iter().map(|p| p.decays).collect(),
                first: first.into_primitive().tensor(),
                second: second.into_primitive().tensor(),
            };
            let out = B::adamw_group(group, norm.clone().into_primitive().tensor(), adamw);
            let float = |t| Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(t));
            self.flat.push(FlatMoments {
                slots,
                moments: Moments {
                    first: float(out.first),
                    second: Some(float(out.second)),
                },
            });
            let replaced = params[range]
                .iter()
                .zip(out.values)
                .map(|(param, value)| (param.id, float(value)))
                .collect();
            model = model.map(&mut Replace::<AB> { values: replaced });
        }
        (model, Some(norm))
    }
}

impl<B: Backend> Optimizer<B> {
    pub fn new(config: OptimizerConfig) -> Self {
        Self {
            config,
            step: 0,
            flat: Vec::new(),
            group_values: GROUP_VALUES,
            parked: HashMap::new(),
            bf16_copies: false,
            #[cfg(test)]
            backend_path: false,
        }
    }

    /// For a model of f32 parameters that computes in bf16: AdamW's kernels (CUDA) then write
    /// each stepped parameter's bf16 copy as they step it, and `qwen_gemm::copies` keeps it,
    /// so that the model's casts of the parameter, forward and backward, take the copy instead
    /// of a cast kernel each. The copies cost 2 bytes a parameter of device memory.
    pub fn keep_bf16_copies(&mut self, keep: bool) {
        self.bf16_copies = keep;
    }

    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// How a step's parameters fall into groups ([`GROUP_VALUES`]): each group's range of
    /// `params` and its slots in the group's flat buffers.
    fn groups(&self, params: &[Stepped]) -> (Vec<std::ops::Range<usize>>, Vec<Vec<Slot>>) {
        let sizes: Vec<usize> = params.iter().map(|p| p.numel).collect();
        let ranges = group_ranges(&sizes, self.group_values);
        let slots = ranges
            .iter()
            .map(|range| slots_of(&params[range.clone()]))
            .collect();
        (ranges, slots)
    }

    /// The flat tensor-op path: each group's gradients gathered end to end, the norm over those,
    /// the rule over each group at once, then a subtraction per parameter.
    fn step_flat<AB, M>(
        &mut self,
        model: M,
        params: Vec<Stepped>,
        parts: Vec<Tensor<B, 1>>,
        lr: f64,
        max_grad_norm: f64,
        adamw: Option<AdamwStep>,
    ) -> (M, Option<Tensor<B, 1>>)
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        let (ranges, groups) = self.groups(&params);
        // Each group's gradients end to end, [group values] f32, and their sum of squares.
        let mut parts = parts.into_iter();
        let grads: Vec<Tensor<B, 1>> = ranges
            .iter()
            .map(|range| Tensor::cat(parts.by_ref().take(range.len()).collect(), 0))
            .collect();
        // One sum per group, in two stages (qwen_model::reduce): burn's one-stage sum of the
        // 0.5b preset's 494M values took about 10 ms on the H200.
        let squares = grads
            .iter()
            .map(|g| qwen_model::reduce::sum_all(g.clone().square()));
        let norm = Tensor::cat(squares.collect(), 0).sum().sqrt();
        let scale = clip_scale(norm.clone(), max_grad_norm);
        let decay = adamw
            .filter(|adamw| adamw.weight_decay != 0.0)
            .map(|adamw| adamw.decay_factor());
        let mut moments = self.moments_for(&groups, &norm.device()).into_iter();
        let mut model = model;
        for ((grad, slots), range) in grads.into_iter().zip(groups).zip(ranges) {
            let grad = match &scale {
                Some(scale) => grad * scale.clone(), // [values] * [1]
                None => grad,
            };
            let (delta, new_moments) = self.rule(grad, moments.next().flatten(), lr, adamw);
            let placed = params[range]
                .iter()
                .zip(&slots)
                .map(|(param, slot)| {
                    let placed = Placed {
                        offset: slot.offset,
                        numel: slot.numel,
                        decays: param.decays,
                    };
                    (param.id, placed)
                })
                .collect();
            if let Some(new_moments) = new_moments {
                self.flat.push(FlatMoments {
                    slots,
                    moments: new_moments,
                });
            }
            model = model.map(&mut Apply::<AB> {
                delta,
                placed,
                decay,
            });
        }
        (model, Some(norm))
    }

    /// The flat moments of each group of `groups`: the last step's where the groups are the
    /// same, else put together from each parameter's own (zeros for a parameter's first step).
    /// `None` for plain SGD, which keeps none. Leaves `self.flat` empty, for the step to fill.
    fn moments_for(&mut self, groups: &[Vec<Slot>], device: &B::Device) -> Vec<Option<Moments<B>>> {
        let (with_first, with_second) = match self.config {
            OptimizerConfig::Sgd { momentum } => (momentum != 0.0, false),
            OptimizerConfig::Adamw { .. } => (true, true),
        };
        let previous = std::mem::take(&mut self.flat);
        if !with_first {
            return groups.iter().map(|_| None).collect();
        }
        let same = previous.len() == groups.len()
            && previous
                .iter()
                .zip(groups)
                .all(|(flat, slots)| &flat.slots == slots);
        if same {
            return previous
                .into_iter()
                .map(|flat| Some(flat.moments))
                .collect();
        }
        for flat in previous {
            self.parked.extend(split(flat));
        }
        groups
            .iter()
            .map(|slots| Some(self.gather_moments(slots, with_second, device)))
            .collect()
    }

    /// One group's flat moments from each parameter's parked ones (zeros for those without).
    fn gather_moments(
        &mut self,
        slots: &[Slot],
        with_second: bool,
        device: &B::Device,
    ) -> Moments<B> {
        let total = slots.last().map_or(0, |s| s.offset + s.numel);
        if slots.iter().all(|s| !self.parked.contains_key(&s.name)) {
            let zeros = || Tensor::<B, 1>::zeros([total], device);
            return Moments {
                first: zeros(),
                second: with_second.then(zeros),
            };
        }
        let mut firsts = Vec::new();
        let mut seconds = Vec::new();
        for slot in slots {
            let zeros = || Tensor::<B, 1>::zeros([slot.numel], device);
            let own = self.parked.remove(&slot.name);
            firsts.push(own.as_ref().map_or_else(zeros, |m| m.first.clone()));
            if with_second {
                seconds.push(own.and_then(|m| m.second).unwrap_or_else(zeros));
            }
        }
        Moments {
            first: Tensor::cat(firsts, 0),
            second: with_second.then(|| Tensor::cat(seconds, 0)),
        }
    }

    /// The rule over the flat (clipped) gradient: what to subtract from every parameter
    /// (before AdamW's decoupled decay, which [`Apply`] does per parameter) and the new moments.
    fn rule(
        &self,
        grad: Tensor<B, 1>,
        moments: Option<Moments<B>>,
        lr: f64,
        adamw: Option<AdamwStep>,
    ) -> (Tensor<B, 1>, Option<Moments<B>>) {
        match (self.config, moments, adamw) {
            (OptimizerConfig::Sgd { .. }, None, _) => (grad.mul_scalar(lr), None),
            (OptimizerConfig::Sgd { momentum }, Some(Moments { first, .. }), _) => {
                // torch: buf = momentum * buf + grad (zeros before the first step give grad).
                let buf = first.mul_scalar(momentum) + grad;
                let delta = buf.clone().mul_scalar(lr);
                let moments = Moments {
                    first: buf,
                    second: None,
                };
                (delta, Some(moments))
            }
            (
                OptimizerConfig::Adamw { .. },
                Some(Moments {
                    first,
                    second: Some(second),
                }),
                Some(adamw),
            ) => {
                let (delta, m, v) = adamw_rule(grad, first, second, &adamw);
                let moments = Moments {
                    first: m,
                    second: Some(v),
                };
                (delta, Some(moments))
            }
            (OptimizerConfig::Adamw { .. }, _, _) => {
                unreachable!("AdamW always has both moments and its step")
            }
        }
    }

    /// Every parameter's moments by name: slices of the flat buffers, then the parked ones.
    fn named_moments(&self) -> Vec<(String, Moments<B>)> {
        let mut named: Vec<_> = self.flat.iter().cloned().flat_map(split).collect();
        named.extend(self.parked.iter().map(|(n, m)| (n.clone(), m.clone())));
        named
    }

    /// Writes the moments to `path` (safetensors, f32, keyed `<param>.exp_avg[_sq]`).
    pub fn save(&self, path: &Path) -> Result<(), TrainError> {
        let mut entries: Vec<(String, Vec<u8>, usize)> = Vec::new();
        for (name, moments) in &self.named_moments() {
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
        let mut parked: HashMap<String, Moments<B>> = HashMap::new();
        for (key, view) in file.iter() {
            let (name, suffix) = key
                .rsplit_once('.')
                .ok_or_else(|| broken(format!("bad key `{key}`")))?;
            let data =
                TensorData::from_bytes_vec(view.data().to_vec(), view.shape().to_vec(), DType::F32);
            let tensor = Tensor::<B, 1>::from_data(data, device);
            let entry = parked.entry(name.to_string()).or_insert_with(|| Moments {
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
            flat: Vec::new(),
            group_values: GROUP_VALUES,
            parked,
            bf16_copies: false,
            #[cfg(test)]
            backend_path: false,
        })
    }
}

/// Each parameter's moments, cut out of the flat buffers.
fn split<B: Backend>(flat: FlatMoments<B>) -> Vec<(String, Moments<B>)> {
    let FlatMoments { slots, moments } = flat;
    slots
        .into_iter()
        .map(|slot| {
            let range = slot.offset..slot.offset + slot.numel;
            let part = |t: &Tensor<B, 1>| t.clone().slice(range.clone());
            let own = Moments {
                first: part(&moments.first),
                second: moments.second.as_ref().map(part),
            };
            (slot.name, own)
        })
        .collect()
}

/// Where a parameter's values sit in its group's flat buffers, and whether AdamW decays it.
#[derive(Debug, Clone, Copy)]
struct Placed {
    offset: usize,
    numel: usize,
    decays: bool,
}

/// A parameter that has a gradient this step.
struct Stepped {
    id: ParamId,
    name: String,
    numel: usize,
    decays: bool,
}

/// The slots of `params` end to end in one group's buffers.
fn slots_of(params: &[Stepped]) -> Vec<Slot> {
    let mut offset = 0;
    params
        .iter()
        .map(|p| {
            let slot = Slot {
                name: p.name.clone(),
                offset,
                numel: p.numel,
            };
            offset += p.numel;
            slot
        })
        .collect()
}

/// Takes every parameter's gradient out of `grads`, flattened to f32, in visiting order.
struct Gather<'a, AB: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    path: Vec<String>,
    params: Vec<Stepped>,
    /// `[numel]` f32 each, in the order of `params`.
    parts: Vec<Tensor<AB::InnerBackend, 1>>,
    /// When asked for: each parameter's value as `[numel]` (its own dtype), in the same order.
    values: Option<Vec<Tensor<AB::InnerBackend, 1>>>,
}

impl<AB: AutodiffBackend> ModuleVisitor<AB> for Gather<'_, AB> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
        let Some(grad) = self.grads.remove::<AB::InnerBackend, D>(param.id) else {
            return;
        };
        let name = self.path.join(".");
        self.params.push(Stepped {
            id: param.id,
            numel: grad.shape().num_elements(),
            decays: decays(&name),
            name,
        });
        self.parts
            .push(grad.flatten::<1>(0, D - 1).cast(DType::F32));
        if let Some(values) = &mut self.values {
            values.push(param.val().inner().flatten::<1>(0, D - 1));
        }
    }
}

/// Puts each parameter's new value (`[numel]`, reshaped to the parameter's shape) in place;
/// parameters without one pass unchanged.
struct Replace<AB: AutodiffBackend> {
    values: HashMap<ParamId, Tensor<AB::InnerBackend, 1>>,
}

impl<AB: AutodiffBackend> ModuleMapper<AB> for Replace<AB> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<AB, D>>) -> Param<Tensor<AB, D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(value) = self.values.remove(&id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let updated = value.reshape(tensor.dims()).cast(tensor.dtype());
        Param::from_mapped_value(id, Tensor::from_inner(updated).require_grad(), mapper)
    }
}

/// Subtracts each parameter's part of one group's `delta`, after AdamW's decay where it
/// applies; parameters of other groups pass unchanged.
struct Apply<AB: AutodiffBackend> {
    /// `[group values]` f32
    delta: Tensor<AB::InnerBackend, 1>,
    placed: HashMap<ParamId, Placed>,
    /// `1 - lr * weight_decay`, for the parameters that decay.
    decay: Option<f64>,
}

impl<AB: AutodiffBackend> ModuleMapper<AB> for Apply<AB> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<AB, D>>) -> Param<Tensor<AB, D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(placed) = self.placed.get(&id).copied() else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let value = tensor.inner();
        let (dtype, shape) = (value.dtype(), value.dims());
        let value = value.cast(DType::F32);
        // torch.optim.AdamW: decay first, then the Adam step.
        let value = match self.decay {
            Some(factor) if placed.decays => value.mul_scalar(factor),
            _ => value,
        };
        let delta = self
            .delta
            .clone()
            .slice(placed.offset..placed.offset + placed.numel)
            .reshape(shape);
        let updated = Tensor::from_inner((value - delta).cast(dtype)).require_grad();
        Param::from_mapped_value(id, updated, mapper)
    }
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
    use burn::backend::{Autodiff, Flex};
    use burn::module::Module;
    use burn::tensor::ElementConversion;

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

    /// Two steps with the gradients `[0.1, -0.2, 0.3]` then `[-0.05, 0.4, 0.0]`, AdamW through
    /// [`OptimizerBackend`]'s tensor-op bodies when `backend_path`.
    fn two_steps(config: OptimizerConfig, lr: f64, backend_path: bool) -> Toy<AB> {
        let mut model = toy();
        let mut optimizer = Optimizer::<Flex>::new(config);
        optimizer.backend_path = backend_path;
        for g in [[0.1f32, -0.2, 0.3], [-0.05, 0.4, 0.0]] {
            let mut grads = GradientsParams::new();
            for id in [model.weight.id, model.bias.id] {
                grads.register::<Flex, 1>(id, Tensor::from_floats(g, &Default::default()));
            }
            (model, _) = optimizer.step(model, &mut grads, lr, 0.0);
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
    /// momentum=0.9)` on the same parameters and gradients (torch 2.15). AdamW both ways: the
    /// flat path and the backend's (its tensor-op bodies here; kernels on CUDA).
    #[test]
    fn adamw_matches_torch_and_spares_biases_from_decay() {
        let config = OptimizerConfig::Adamw {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        for backend_path in [false, true] {
            let model = two_steps(config, 0.01, backend_path);
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
    }

    #[test]
    fn sgd_with_momentum_matches_torch() {
        let model = two_steps(OptimizerConfig::Sgd { momentum: 0.9 }, 0.1, false);
        assert_close(&values(&model.weight), &[0.486, -1.002, 1.943]);
    }

    /// A step clips as `clip_grad_norm_` does: the global norm of `[3, 0, 0]` and `[0, 4, 0]`
    /// is 5, returned before clipping; with `max_norm` 1 every gradient is scaled by
    /// `1 / (5 + 1e-6)` (here SGD, lr 1, so the parameters move by exactly that), with 10 or 0
    /// not at all. A parameter without a gradient does not move.
    #[test]
    fn steps_clip_to_the_global_norm_as_torch() {
        let device = Default::default();
        let run = |max_norm: f64, with_bias: bool| {
            let model = toy();
            let mut optimizer = Optimizer::<Flex>::new(OptimizerConfig::Sgd { momentum: 0.0 });
            let mut grads = GradientsParams::new();
            grads.register::<Flex, 1>(
                model.weight.id,
                Tensor::from_floats([3.0, 0.0, 0.0], &device),
            );
            if with_bias {
                grads.register::<Flex, 1>(
                    model.bias.id,
                    Tensor::from_floats([0.0, 4.0, 0.0], &device),
                );
            }
            let (model, norm) = optimizer.step(model, &mut grads, 1.0, max_norm);
            let norm = norm.expect("a gradient").into_scalar().elem::<f64>();
            (values(&model.weight), values(&model.bias), norm)
        };
        let factor = (1.0 / (5.0 + 1e-6)) as f32;
        let (weight, bias, norm) = run(1.0, true);
        assert_eq!(norm, 5.0);
        assert_close(&weight, &[0.5 - 3.0 * factor, -1.0, 2.0]);
        assert_close(&bias, &[0.5, -1.0 - 4.0 * factor, 2.0]);
        for max_norm in [10.0, 0.0] {
            let (weight, bias, _) = run(max_norm, true);
            assert_eq!(weight, [-2.5, -1.0, 2.0]);
            assert_eq!(bias, [0.5, -5.0, 2.0]);
        }
        let (weight, bias, norm) = run(0.0, false);
        assert_eq!((weight, norm), (vec![-2.5, -1.0, 2.0], 3.0));
        assert_eq!(bias, [0.5, -1.0, 2.0]);

        let norm = Tensor::<Flex, 1>::from_floats([5.0], &device);
        let scale = clip_scale(norm.clone(), 1.0)
            .unwrap()
            .into_scalar()
            .elem::<f64>();
        assert!((scale - 1.0 / (5.0 + 1e-6)).abs() < 1e-7, "{scale}");
        assert!(clip_scale(norm, 0.0).is_none());
    }

    /// The moments of a parameter that has no gradient in a step are kept (as torch keeps
    /// them) and taken up again when it has one: AdamW over steps where the bias sits one out
    /// ends where a fresh optimizer that saw the bias's gradients alone would.
    #[test]
    fn moments_survive_a_step_without_the_gradient() {
        let device = Default::default();
        let g = |v: [f32; 3]| Tensor::<Flex, 1>::from_floats(v, &device);
        let config = OptimizerConfig::default();
        // Both parameters, then the weight alone, then both again.
        let mut model = toy();
        let mut optimizer = Optimizer::<Flex>::new(config);
        for with_bias in [true, false, true] {
            let mut grads = GradientsParams::new();
            grads.register::<Flex, 1>(model.weight.id, g([0.1, -0.2, 0.3]));
            if with_bias {
                grads.register::<Flex, 1>(model.bias.id, g([-0.3, 0.2, 0.5]));
            }
            (model, _) = optimizer.step(model, &mut grads, 0.01, 0.0);
        }
        // The bias's own history: its two gradients at steps 1 and 3 (bias correction follows
        // the global step count, as before).
        let mut alone = toy();
        let mut reference = Optimizer::<Flex>::new(config);
        for with_bias in [true, false, true] {
            let mut grads = GradientsParams::new();
            if with_bias {
                grads.register::<Flex, 1>(alone.bias.id, g([-0.3, 0.2, 0.5]));
            }
            (alone, _) = reference.step(alone, &mut grads, 0.01, 0.0);
        }
        assert_eq!(values(&model.bias), values(&alone.bias));
        assert_ne!(values(&model.bias), values(&toy().bias));
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
        (model, _) = optimizer.step(model, &mut grads, 0.01, 0.0);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("optimizer.safetensors");
        optimizer.save(&path).unwrap();
        let loaded = Optimizer::<Flex>::load(config, &path, &Default::default()).unwrap();
        assert_eq!(loaded.steps_taken(), 1);
        let named = |o: &Optimizer<Flex>| o.named_moments().into_iter().collect::<HashMap<_, _>>();
        let (a, b) = (&named(&optimizer)["weight"], &named(&loaded)["weight"]);
        assert_eq!(a.first.to_data(), b.first.to_data());
        assert_eq!(
            a.second.as_ref().unwrap().to_data(),
            b.second.as_ref().unwrap().to_data()
        );
        assert_eq!(named(&loaded).len(), 1, "only the weight had a gradient");
        drop(model);
    }

    #[test]
    fn groups_are_consecutive_runs_under_the_limit() {
        assert_eq!(group_ranges(&[3, 3, 3], 6), vec![0..2, 2..3]);
        assert_eq!(group_ranges(&[3, 9, 1, 1], 6), vec![0..1, 1..2, 2..4]);
        assert_eq!(group_ranges(&[7], 6), vec![0..1]);
        assert_eq!(group_ranges(&[], 6), Vec::<std::ops::Range<usize>>::new());
    }

    /// Stepping a group at a time changes nothing: one parameter per group against one group
    /// for both, over AdamW steps with clipping (the global norm spans the groups) and a step
    /// where the bias sits out (its moments are parked and taken up again).
    #[test]
    fn groups_step_as_one_flat_buffer_does() {
        let device = Default::default();
        let g = |v: [f32; 3]| Tensor::<Flex, 1>::from_floats(v, &device);
        let run = |group_values: usize, backend_path: bool| {
            let mut model = toy();
            let config = OptimizerConfig::Adamw {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.1,
            };
            let mut optimizer = Optimizer::<Flex>::new(config);
            optimizer.group_values = group_values;
            optimizer.backend_path = backend_path;
            let mut norms = Vec::new();
            for (step, with_bias) in [true, true, false, true].into_iter().enumerate() {
                let mut grads = GradientsParams::new();
                let s = step as f32;
                grads.register::<Flex, 1>(model.weight.id, g([0.1 * s, -0.2, 0.3]));
                if with_bias {
                    grads.register::<Flex, 1>(model.bias.id, g([-0.3, 0.2 + s, 0.5]));
                }
                let (stepped, norm) = optimizer.step(model, &mut grads, 0.01, 0.5);
                model = stepped;
                norms.push(norm.unwrap().into_scalar().elem::<f32>());
            }
            let moments: Vec<_> = ["weight", "bias"]
                .iter()
                .map(|name| {
                    let named: HashMap<_, _> = optimizer.named_moments().into_iter().collect();
                    let m = &named[*name];
                    let data = |t: &Tensor<Flex, 1>| t.to_data().to_vec::<f32>().unwrap();
                    (data(&m.first), data(m.second.as_ref().unwrap()))
                })
                .collect();
            (
                values(&model.weight),
                values(&model.bias),
                norms,
                moments,
                optimizer.flat.len(),
            )
        };
        let (weight, bias, norms, moments, groups) = run(3, false);
        assert_eq!(groups, 2);
        let (weight_1, bias_1, norms_1, moments_1, groups_1) = run(GROUP_VALUES, false);
        assert_eq!(groups_1, 1);
        assert_eq!(norms, norms_1);
        assert!(norms[1] > 0.5, "clipping took part: {norms:?}");
        assert_eq!((&weight, &bias, &moments), (&weight_1, &bias_1, &moments_1));
        // The backend's path, one group and two, against the flat one: the same step, summed
        // and rounded in another order.
        for (group_values, groups) in [(3, 2), (GROUP_VALUES, 1)] {
            let (weight_2, bias_2, norms_2, moments_2, groups_2) = run(group_values, true);
            assert_eq!(groups_2, groups);
            assert_close(&norms_2, &norms);
            assert_close(&weight_2, &weight);
            assert_close(&bias_2, &bias);
            for ((first, second), (first_2, second_2)) in moments.iter().zip(&moments_2) {
                assert_close(first_2, first);
                assert_close(second_2, second);
            }
        }
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
