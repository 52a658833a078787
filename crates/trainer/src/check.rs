//! `qwen-sft check-fast-path`: the fast path that training runs against the reference path, on
//! one batch, forward and backward.
//!
//! ```text
//! batch -> fast:      chunked attention -> hidden -> fused lm_head + loss (as train) -> backward
//!       -> reference: plain attention   -> hidden -> full logits -> plain cross-entropy -> backward
//!                     (and burn's matmul in the linear layers and tensor ops for the rest,
//!                     whatever `--gemm` and `--kernels` picked)
//!       -> max |fast - reference| / max |reference| of the logits, the loss, each gradient
//! fast gradients -> two AdamW steps through the backend (its kernels on CUDA) and through the
//!                   flat tensor-op path -> max |difference| / max |step| over the parameters
//! ```
//!
//! In bf16 the two paths round at different places, and a bf16 path is itself 5-12% from the
//! f32 values on the small random fixture model. The model's kernels round op by op, as
//! PyTorch's eager bf16 does; burn's fusion keeps a fused chain of tensor ops in f32 and rounds
//! once. On CUDA the fast path therefore equals the reference exactly in a build without
//! fusion, and is 3% from it with fusion, where the reference is the one that rounds
//! differently (docs/BENCHMARKS.md). So a bf16 check also runs the reference path in f32, and
//! the fast path passes when it is within the tolerance of the bf16 reference, or when, figure
//! by figure and parameter by parameter, it is no farther from the f32 path than the bf16
//! reference is (up to [`F32_SLACK`]) or than the bf16 reference's worst figure (bf16's own
//! error on this model; never below the tolerance).
//!
//! The logits are compared at real tokens only: the two attention bodies give padding rows
//! different (unused) outputs, see [`qwen_model::attention`].

use std::path::Path;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, ElementConversion, Int, Tensor, TensorData};
use qwen_chat::{
    Batch, Chat, ChatTokenizer, DataReport, DatasetOptions, Loader, LoaderConfig, Message,
};
use qwen_loss::{
    ChunkedCeBackend, CrossEntropyOptions, LIVE_TILE_BUFFERS, Reduction, masked_cross_entropy,
};
use qwen_model::attention::AttentionPlan;
use qwen_model::linear::{GemmBody, gemm_body, set_gemm_body};
use qwen_model::{
    AttentionBackend, AttentionImpl, Qwen2Config, Qwen2ForCausalLM, named_parameters,
};
use qwen_model::{Kernel, KernelBody, kernel_body, kernels_off, set_kernels_off};
use serde::Serialize;

use crate::config::Precision;
use crate::error::TrainError;
use crate::fused_adamw::OptimizerBackend;
use crate::optim::{Optimizer, OptimizerConfig};
use crate::tensors::{DeviceBatch, to_device};
use crate::train::{lm_head_loss, load_examples};

/// The relative tolerance when none is given: f32 paths agree to about 1e-5 on the CPU, bf16
/// ones to a few units of bf16's 2^-8. On CUDA burn's f32 matmuls round to TF32, where the loss
/// crate measured the two loss paths' gradients about 5e-4 apart, so f32 there needs a looser
/// tolerance than this default.
pub fn default_tolerance(precision: Precision) -> f64 {
    match precision {
        Precision::F32 => 1e-4,
        Precision::Bf16 => 3e-2,
    }
}

/// The one JSON line that `qwen-sft check-fast-path` prints.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub backend: String,
    pub precision: Precision,
    pub rows: usize,
    /// Non-padding tokens of the batch.
    pub tokens: usize,
    /// The linear layers' body on the fast path; the reference path runs `burn`.
    pub gemm: &'static str,
    /// The model's own kernels on the fast path (`kernel` or `tensor-ops`); the reference path
    /// runs the plain reference attention and tensor ops.
    pub kernels: String,
    #[serde(flatten)]
    pub differences: Differences,
    pub tolerance: f64,
    /// bf16 only: both paths against the reference path run in f32.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub against_f32: Option<AgainstF32>,
    /// Whether the backend steps AdamW in kernels of its own (`fused_adamw`).
    pub optimizer_kernels: bool,
    /// Two AdamW steps on the fast path's gradients, through the backend (its kernels where
    /// it has them) and through the flat tensor-op path, from the same start:
    /// `max |fast - flat| / max |flat - start|` over the parameters, worst parameter (f32
    /// both, whatever the precision). At most [`OPTIMIZER_TOLERANCE`] to pass.
    pub optimizer_rel: f64,
    pub pass: bool,
}

/// Both optimizer paths compute in f32 and differ in the order of their sums and roundings:
/// some 1e-6 of a step. A lost term is far off: the decay the check uses is 1e-2 of a step.
pub const OPTIMIZER_TOLERANCE: f64 = 1e-3;

/// [`CheckReport::optimizer_rel`]: two AdamW steps (lr 1e-3, weight decay 0.5, the gradients
/// clipped to a norm of 1e-3) from `model` with `grads`, as `run_path` gives them, through the
/// backend and through the flat path (the AdamW kernel turned off).
fn optimizer_difference<B>(
    model: &Qwen2ForCausalLM<B>,
    grads: &[(String, Option<Tensor<B::InnerBackend, 1>>)],
) -> f64
where
    B: AutodiffBackend,
    B::InnerBackend: OptimizerBackend,
{
    let config = OptimizerConfig::Adamw {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.5,
    };
    let device = model.lm_head_weight().device();
    let run = |by_backend: bool| {
        let was_off = kernels_off();
        if !by_backend {
            set_kernels_off(&[was_off.clone(), vec![Kernel::Adamw]].concat());
        }
        let mut optimizer = Optimizer::<B::InnerBackend>::new(config);
        let mut stepped = model.clone();
        for _ in 0..2 {
            let mut params = register_grads(&stepped, grads);
            (stepped, _) = optimizer.step(stepped, &mut params, 1e-3, 1e-3);
        }
        let values = param_values(&stepped);
        // A lazy backend runs the step when it is needed: now, under this setting.
        B::sync(&device).expect("the device failed");
        set_kernels_off(&was_off);
        values
    };
    let (start, fast, flat) = (param_values(model), run(true), run(false));
    start
        .into_iter()
        .zip(fast.into_iter().zip(flat))
        .map(|(start, (fast, flat))| relative(fast - start.clone(), flat - start))
        .fold(0.0, |worst, rel| nan_last(rel).max(worst))
}

/// `grads` (flattened, in `named_parameters` order, as [`named_grads`] gives them) as the
/// gradients of `model`'s parameters.
fn register_grads<B: AutodiffBackend>(
    model: &Qwen2ForCausalLM<B>,
    grads: &[(String, Option<Tensor<B::InnerBackend, 1>>)],
) -> GradientsParams {
    struct Register<'a, B: AutodiffBackend> {
        grads: std::slice::Iter<'a, (String, Option<Tensor<B::InnerBackend, 1>>)>,
        out: GradientsParams,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Register<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let (_, grad) = self.grads.next().expect("a gradient slot per parameter");
            if let Some(grad) = grad {
                let grad = grad.clone().reshape(param.val().dims());
                self.out.register::<B::InnerBackend, D>(param.id, grad);
            }
        }
    }
    let mut register = Register::<B> {
        grads: grads.iter(),
        out: GradientsParams::new(),
    };
    model.visit(&mut register);
    register.out
}

/// Every parameter's value, flattened, in f32.
fn param_values<B: AutodiffBackend>(
    model: &Qwen2ForCausalLM<B>,
) -> Vec<Tensor<B::InnerBackend, 1>> {
    struct Values<B: AutodiffBackend>(Vec<Tensor<B::InnerBackend, 1>>);
    impl<B: AutodiffBackend> ModuleVisitor<B> for Values<B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let value = param.val().inner().flatten::<1>(0, D - 1);
            self.0.push(value.cast(DType::F32));
        }
    }
    let mut values = Values::<B>(Vec::new());
    model.visit(&mut values);
    values.0
}

/// How far each bf16 path is from the reference path in f32.
#[derive(Debug, Clone, Serialize)]
pub struct AgainstF32 {
    pub fast: Differences,
    pub reference: Differences,
    /// The figure (`logits`, `loss` or a parameter's name) where the fast path comes closest
    /// to failing, with both paths' figures there.
    pub closest_figure: String,
    pub closest_fast: f64,
    pub closest_reference: f64,
    /// Every parameter's figure: its name, the fast path's, the reference's.
    pub per_parameter: Vec<(String, f64, f64)>,
    /// Whether in the logits, the loss and every parameter's gradient the fast path is no
    /// farther from f32 than the bf16 reference path is (times [`F32_SLACK`]), or than the
    /// reference's worst figure (at least the tolerance).
    pub fast_no_farther: bool,
}

impl AgainstF32 {
    fn new(fast: Differences, reference: Differences, tolerance: f64) -> Self {
        // bf16's own error on this model and batch: the reference's worst figure.
        let floor = [
            reference.logits_rel,
            reference.loss_rel,
            reference.grad_rel_max,
        ]
        .into_iter()
        .fold(tolerance, f64::max);
        let (ratio, closest, ours, theirs) = fast.closest_to(&reference, F32_SLACK, floor);
        let per_parameter = fast
            .grad_rel
            .iter()
            .zip(&reference.grad_rel)
            .map(|((name, ours), (_, theirs))| (name.clone(), *ours, *theirs))
            .collect();
        Self {
            per_parameter,
            fast_no_farther: ratio <= 1.0,
            closest_figure: closest,
            closest_fast: ours,
            closest_reference: theirs,
            fast,
            reference,
        }
    }
}

/// How far one figure of a path (`ours`, its distance from the f32 path) is, as
/// `ours / max(slack * theirs, floor)` where `theirs` is the bf16 reference's: at most 1 when
/// it is no farther than the rule allows, infinite for NaN.
pub(crate) fn farther_ratio(ours: f64, theirs: f64, slack: f64, floor: f64) -> f64 {
    nan_last(ours / (slack * theirs).max(floor))
}

/// How much farther from the f32 path than the bf16 reference the fast path may be: rounding
/// at other places gives errors of the same size, not the same errors. A wrong gradient (a
/// lost term, a wrong scale) is many times farther.
pub const F32_SLACK: f64 = 1.5;

/// How far the fast path is from the reference, each as `max |fast - ref| / max |ref|`.
#[derive(Debug, Clone, Serialize)]
pub struct Differences {
    pub logits_rel: f64,
    pub loss_rel: f64,
    /// The largest over the parameters; a gradient that one path has and the other lacks is
    /// infinitely far.
    pub grad_rel_max: f64,
    pub grad_rel_worst_param: String,
    /// Each parameter's name and figure, in `named_parameters` order.
    #[serde(skip)]
    pub grad_rel: Vec<(String, f64)>,
}

impl Differences {
    /// Whether every figure is within `tolerance` (NaN is not).
    pub fn within(&self, tolerance: f64) -> bool {
        [self.logits_rel, self.loss_rel, self.grad_rel_max]
            .iter()
            .all(|&rel| rel <= tolerance)
    }

    /// Each figure of `self` (the logits, the loss, each parameter's gradient) against the
    /// same figure of `other`, as `ours / max(slack * theirs, floor)`: the largest of these
    /// ratios (infinite for NaN, or when the parameters differ), the figure's name, and both
    /// figures there. At most 1: no figure farther than `slack` times `other`'s, or than
    /// `floor`.
    pub fn closest_to(
        &self,
        other: &Differences,
        slack: f64,
        floor: f64,
    ) -> (f64, String, f64, f64) {
        if self.grad_rel.len() != other.grad_rel.len() {
            return (f64::INFINITY, "parameters".into(), f64::NAN, f64::NAN);
        }
        let figures = [
            ("logits".to_string(), self.logits_rel, other.logits_rel),
            ("loss".to_string(), self.loss_rel, other.loss_rel),
        ];
        let grads = self
            .grad_rel
            .iter()
            .zip(&other.grad_rel)
            .map(|((name, ours), (_, theirs))| (name.clone(), *ours, *theirs));
        figures
            .into_iter()
            .chain(grads)
            .map(|(name, ours, theirs)| {
                (
                    farther_ratio(ours, theirs, slack, floor),
                    name,
                    ours,
                    theirs,
                )
            })
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .expect("the logits and the loss are always there")
    }
}

/// The chats used when no data file is given. With the defaults (2 rows of 64, packed) they give
/// one row with the long chat and one with the two short ones packed, both padded.
fn builtin_chats() -> Vec<Chat> {
    vec![
        Chat::new(vec![
            Message::system("You are a helpful assistant."),
            Message::user("Why is the sky blue? One sentence."),
            Message::assistant(
                "Air scatters blue sunlight more than red, so blue reaches us from every \
                 direction.",
            ),
        ]),
        Chat::new(vec![
            Message::system("Be brief."),
            Message::user("Capital of France?"),
            Message::assistant("Paris."),
        ]),
        Chat::new(vec![
            Message::system("Be brief."),
            Message::user("1+1?"),
            Message::assistant("2"),
        ]),
    ]
}

/// The first batch that training would build from `data` (the built-in chats when `None`):
/// packed rows of `max_len`, in file order.
pub fn first_batch(
    tokenizer: &ChatTokenizer,
    data: Option<&Path>,
    batch_size: usize,
    max_len: usize,
) -> Result<Batch, TrainError> {
    let opts = DatasetOptions {
        max_len,
        ..DatasetOptions::default()
    };
    let examples = match data {
        Some(file) => load_examples(tokenizer, &[file.to_path_buf()], &opts)?.0,
        None => tokenizer.tokenize_chats(&builtin_chats(), &opts, &mut DataReport::default())?,
    };
    let config = LoaderConfig {
        batch_rows: batch_size,
        max_len,
        packing: true,
        shuffle: false,
        pad_id: tokenizer.pad_id(),
        ..LoaderConfig::default()
    };
    Loader::new(examples, config)?
        .next_batch()
        .ok_or_else(|| TrainError::NoData("the data yields no batch".into()))
}

/// Budgets that cut this batch's attention into [`SEAMS`] query chunks and its loss into
/// [`SEAMS`] row tiles, so the chunk boundaries are checked too, whatever the model's size;
/// never above training's defaults.
fn seam_budgets(config: &Qwen2Config, batch: &Batch) -> (usize, usize) {
    let train = crate::config::TrainConfig::default().train;
    let attention =
        AttentionPlan::bytes_per_query_row(batch.rows, config.num_attention_heads, batch.len)
            * batch.len.div_ceil(SEAMS);
    let loss =
        4 * LIVE_TILE_BUFFERS * config.vocab_size * batch.supervised_tokens().div_ceil(SEAMS);
    (
        attention.min(train.attention_chunk_mib << 20),
        loss.min(train.loss_chunk_mib << 20),
    )
}

/// How many chunks [`seam_budgets`] aims for.
const SEAMS: usize = 4;

/// Runs both paths of `model` on `batch` in `precision` and compares them.
pub fn check_fast_path<B>(
    model: Qwen2ForCausalLM<B>,
    config: &Qwen2Config,
    batch: &Batch,
    precision: Precision,
    tolerance: f64,
    backend_name: &str,
) -> Result<CheckReport, TrainError>
where
    B: AutodiffBackend + ChunkedCeBackend + AttentionBackend,
    B::InnerBackend: OptimizerBackend,
{
    let device_batch = to_device::<B>(batch, &model.lm_head_weight().device());
    let (attention_bytes, loss_bytes) = seam_budgets(config, batch);
    let model = model.with_attention_chunk_bytes(attention_bytes);
    let model_f32 = (precision == Precision::Bf16).then(|| model.clone());
    let model = match precision {
        Precision::F32 => model,
        Precision::Bf16 => model.with_compute_dtype(DType::BF16),
    };
    let loss_opts = CrossEntropyOptions::default()
        .with_reduction(Reduction::Sum)
        .with_chunk_memory_bytes(loss_bytes);
    let device = model.lm_head_weight().device();
    let fast_body = gemm_body();
    let fast = run_path(&model, PathKind::Fast, &device_batch, &loss_opts)?;
    // A lazy backend (fusion) runs the queued products when they are needed: run them now,
    // while the fast body is still the one set.
    B::sync(&device).expect("the device failed");
    let gemm = B::gemm_name();
    let kernels = crate::bench::kernels_name::<B>();
    let fast_kernels = kernel_body();
    set_gemm_body(GemmBody::Burn);
    crate::bench::set_kernel_bodies(KernelBody::TensorOps);
    let reference = run_path(&model, PathKind::Reference, &device_batch, &loss_opts);
    let reference_f32 = model_f32
        .map(|model| run_path(&model, PathKind::Reference, &device_batch, &loss_opts))
        .transpose();
    B::sync(&device).expect("the device failed");
    set_gemm_body(fast_body);
    crate::bench::set_kernel_bodies(fast_kernels);
    let (reference, reference_f32) = (reference?, reference_f32?);
    let differences = compare(&fast, &reference);
    let against_f32 = reference_f32.map(|f32_path| {
        let (fast, reference) = (compare(&fast, &f32_path), compare(&reference, &f32_path));
        AgainstF32::new(fast, reference, tolerance)
    });
    let optimizer_kernels = B::InnerBackend::has_adamw_kernels();
    let optimizer_rel = optimizer_difference(&model, &fast.grads);
    let pass = (differences.within(tolerance)
        || against_f32.as_ref().is_some_and(|a| a.fast_no_farther))
        && optimizer_rel <= OPTIMIZER_TOLERANCE;
    Ok(CheckReport {
        optimizer_kernels,
        optimizer_rel,
        backend: backend_name.to_string(),
        precision,
        rows: batch.rows,
        tokens: device_batch.tokens,
        gemm,
        kernels,
        pass,
        differences,
        tolerance,
        against_f32,
    })
}

/// Which path [`run_path`] takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind {
    /// What training runs: chunked attention, the fused lm_head + loss.
    Fast,
    /// Plain attention, full logits, plain cross-entropy.
    Reference,
}

/// What one path gives on a batch.
pub struct PathOutput<B: AutodiffBackend> {
    /// `[rows, len, vocab]`, 0 at padding.
    pub logits: Tensor<B::InnerBackend, 3>,
    /// The summed loss over the batch's supervised tokens, divided by their count.
    pub loss: f64,
    /// Every parameter's name and gradient, flattened, in f32.
    pub grads: Vec<(String, Option<Tensor<B::InnerBackend, 1>>)>,
}

/// One forward and backward pass of `model` down `kind`'s path; `opts` should sum.
pub fn run_path<B>(
    model: &Qwen2ForCausalLM<B>,
    kind: PathKind,
    batch: &DeviceBatch<B>,
    opts: &CrossEntropyOptions,
) -> Result<PathOutput<B>, TrainError>
where
    B: AutodiffBackend + ChunkedCeBackend + AttentionBackend,
{
    let attention = match kind {
        PathKind::Fast => AttentionImpl::Chunked,
        PathKind::Reference => AttentionImpl::Reference,
    };
    let model = model.clone().with_attention_impl(attention);
    // [rows, len, hidden]
    let hidden = model.hidden_states(&batch.input, None);
    // [rows, len, vocab]
    let logits = model.logits(hidden.clone());
    let [rows, len, vocab] = logits.dims();
    let loss = match kind {
        PathKind::Fast => lm_head_loss(&model, hidden, &batch.targets, opts)?,
        PathKind::Reference => {
            let targets = Tensor::<B, 1, Int>::from_data(
                TensorData::new(batch.targets.clone(), [rows * len]),
                &logits.device(),
            );
            masked_cross_entropy(logits.clone().reshape([rows * len, vocab]), targets, opts)?
        }
    }
    .normalized_by(batch.supervised);
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    // [rows, len] -> [rows, len, vocab]
    let padding = batch
        .input
        .segment_ids
        .clone()
        .expect("to_device sets the segment ids")
        .equal_elem(0)
        .inner()
        .unsqueeze_dim::<3>(2)
        .expand([rows, len, vocab]);
    Ok(PathOutput {
        logits: logits.inner().mask_fill(padding, 0.0),
        loss: loss.into_scalar().elem(),
        grads: named_grads(&model, &grads),
    })
}

/// Each parameter's name and gradient, flattened, in f32.
fn named_grads<B: AutodiffBackend>(
    model: &Qwen2ForCausalLM<B>,
    grads: &GradientsParams,
) -> Vec<(String, Option<Tensor<B::InnerBackend, 1>>)> {
    struct Collect<'a, B: AutodiffBackend> {
        grads: &'a GradientsParams,
        out: Vec<Option<Tensor<B::InnerBackend, 1>>>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Collect<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let grad = self.grads.get::<B::InnerBackend, D>(param.id);
            self.out
                .push(grad.map(|g| g.flatten::<1>(0, D - 1).cast(DType::F32)));
        }
    }
    let mut collect = Collect::<B> {
        grads,
        out: Vec::new(),
    };
    model.visit(&mut collect);
    // `named_parameters` visits the parameters in the same order.
    let names = named_parameters(model).into_iter().map(|(name, _, _)| name);
    names.zip(collect.out).collect()
}

/// How far `fast` is from `reference`.
pub fn compare<B: AutodiffBackend>(fast: &PathOutput<B>, reference: &PathOutput<B>) -> Differences {
    let grad_rel: Vec<(String, f64)> = fast
        .grads
        .iter()
        .zip(&reference.grads)
        .map(|((name, a), (_, b))| {
            let rel = match (a, b) {
                (Some(a), Some(b)) => relative(a.clone(), b.clone()),
                (None, None) => 0.0,
                _ => f64::INFINITY,
            };
            (name.clone(), rel)
        })
        .collect();
    let worst = grad_rel
        .iter()
        .map(|(name, rel)| (*rel, name.clone()))
        // NaN counts as the worst.
        .max_by(|x, y| nan_last(x.0).total_cmp(&nan_last(y.0)));
    let (grad_rel_max, grad_rel_worst_param) = worst.unwrap_or_default();
    Differences {
        logits_rel: relative(fast.logits.clone(), reference.logits.clone()),
        loss_rel: ratio((fast.loss - reference.loss).abs(), reference.loss.abs()),
        grad_rel_max,
        grad_rel_worst_param,
        grad_rel,
    }
}

fn nan_last(x: f64) -> f64 {
    if x.is_nan() { f64::INFINITY } else { x }
}

/// `max |a - b| / max |b|`, in f32.
pub(crate) fn relative<B: Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f64 {
    let b = b.cast(DType::F32);
    let max_abs = |t: Tensor<B, D>| t.abs().max().into_scalar().elem::<f64>();
    ratio(max_abs(a.cast(DType::F32) - b.clone()), max_abs(b))
}

/// `diff / scale`, where no difference is 0 whatever the scale.
fn ratio(diff: f64, scale: f64) -> f64 {
    if diff == 0.0 { 0.0 } else { diff / scale }
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, Flex};

    use super::*;

    type AB = Autodiff<Flex>;

    fn fixture_batch() -> Batch {
        first_batch(&ChatTokenizer::bundled().unwrap(), None, 2, 64).unwrap()
    }

    #[test]
    fn the_builtin_batch_is_packed_and_padded() {
        let batch = fixture_batch();
        assert_eq!(batch.rows, 2);
        assert!(batch.segment_ids.contains(&2), "no row holds two chats");
        let rows: Vec<&[i32]> = batch.segment_ids.chunks(batch.len).collect();
        assert!(
            rows.iter().all(|row| row.contains(&0)),
            "a row without padding"
        );
        assert!(batch.supervised_tokens() > 0);
    }

    fn differences(logits: f64, loss: f64, grads: &[f64]) -> Differences {
        Differences {
            logits_rel: logits,
            loss_rel: loss,
            grad_rel_max: grads.iter().copied().fold(0.0, f64::max),
            grad_rel_worst_param: String::new(),
            grad_rel: grads
                .iter()
                .enumerate()
                .map(|(i, &g)| (format!("p{i}"), g))
                .collect(),
        }
    }

    /// Parameter by parameter, not max against max: a gradient that is twice as far as the
    /// reference's on the same parameter fails even below the reference's worst figure, unless
    /// it is within the floor.
    #[test]
    fn closest_to_compares_each_figure_with_its_own() {
        let reference = differences(0.02, 1e-4, &[0.03, 0.004]);
        let ratio = |d: Differences, floor: f64| d.closest_to(&reference, 1.5, floor);
        assert!(ratio(differences(0.025, 1e-4, &[0.04, 0.005]), 0.0).0 <= 1.0);
        let (r, name, ours, theirs) = ratio(differences(0.02, 1e-4, &[0.01, 0.009]), 0.0);
        assert!(r > 1.0);
        assert_eq!((name.as_str(), ours, theirs), ("p1", 0.009, 0.004));
        // ... but 0.009 is within a floor of 0.01.
        assert!(ratio(differences(0.02, 1e-4, &[0.01, 0.009]), 0.01).0 <= 1.0);
        let (r, name, ..) = ratio(differences(0.04, 1e-4, &[0.03, 0.004]), 0.0);
        assert!(r > 1.0 && name == "logits");
        assert!(ratio(differences(0.02, 1e-4, &[0.03]), 0.0).0.is_infinite());
        let (r, name, ..) = ratio(differences(f64::NAN, 1e-4, &[0.03, 0.004]), 1.0);
        assert!(r.is_infinite() && name == "logits");
    }

    /// The same fast path on the fixture model and on a copy whose final norm is scaled by 1.5:
    /// the comparison must see logits 50% apart and gradients far apart, so it cannot pass
    /// vacuously.
    #[test]
    fn a_perturbed_weight_is_caught() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/model/tied_f32");
        let device = Default::default();
        let (_, model) = qwen_model::load_pretrained::<AB>(&dir, &device, DType::F32).unwrap();
        let mut perturbed = model.clone();
        perturbed.model.norm.weight = perturbed
            .model
            .norm
            .weight
            .map(|w| w.mul_scalar(1.5).detach().require_grad());
        let batch = to_device::<AB>(&fixture_batch(), &device);
        let opts = CrossEntropyOptions::default().with_reduction(Reduction::Sum);
        let a = run_path(&perturbed, PathKind::Fast, &batch, &opts).unwrap();
        let b = run_path(&model, PathKind::Fast, &batch, &opts).unwrap();
        let d = compare(&a, &b);
        assert!((d.logits_rel - 0.5).abs() < 1e-3, "{d:?}");
        assert!(d.loss_rel > 0.0, "{d:?}");
        assert!(d.grad_rel_max > 0.1, "{d:?}");
        assert!(!d.within(default_tolerance(Precision::Bf16)));

        // In bf16, against the f32 path: the bf16 reference passes as a fast path would, the
        // perturbed copy fails.
        let tolerance = default_tolerance(Precision::Bf16);
        let f32_path = run_path(&model, PathKind::Reference, &batch, &opts).unwrap();
        let bf16 = |m: &Qwen2ForCausalLM<AB>, kind| {
            run_path(
                &m.clone().with_compute_dtype(DType::BF16),
                kind,
                &batch,
                &opts,
            )
            .unwrap()
        };
        let reference = compare(&bf16(&model, PathKind::Reference), &f32_path);
        let fast = compare(&bf16(&model, PathKind::Fast), &f32_path);
        let wrong = compare(&bf16(&perturbed, PathKind::Fast), &f32_path);
        assert!(AgainstF32::new(fast, reference.clone(), tolerance).fast_no_farther);
        let caught = AgainstF32::new(wrong, reference, tolerance);
        assert!(!caught.fast_no_farther, "{caught:?}");
    }
}
