//! The training loop, top to bottom in one place:
//!
//! ```text
//! batch -> forward -> masked loss -> backward -> global-norm clip -> optimizer step -> schedule
//! ```

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Tensor};
use qwen_chat::{Cursor, DataReport, DatasetOptions, Example, Loader, LoaderConfig};
use qwen_loss::{
    ChunkedCeBackend, CrossEntropyOptions, LossOutput, Reduction, chunked_lm_head_cross_entropy,
};
use qwen_model::{AttentionBackend, Qwen2ForCausalLM, SaveOptions};

use crate::checkpoint::{self, TrainerState};
use crate::config::{Precision, TrainConfig};
use crate::error::TrainError;
use crate::eval::{EvalMetrics, evaluate};
use crate::fused_adamw::OptimizerBackend;
use crate::metrics::{MetricsLog, StepMetrics};
use crate::optim::Optimizer;
use crate::schedule::Schedule;
use crate::source::{self, LoadedModel};
use crate::tensors::to_device;

/// What a run reports while it goes.
pub trait Observer {
    fn on_start(&mut self, _info: &RunInfo) {}
    fn on_step(&mut self, _metrics: &StepMetrics) {}
    fn on_eval(&mut self, _metrics: &EvalMetrics) {}
    fn on_checkpoint(&mut self, _path: &Path) {}
}

/// An observer that reports nothing.
pub struct Silent;
impl Observer for Silent {}

/// An observer that keeps every step's metrics, for callers that inspect a run afterwards.
#[derive(Debug, Default)]
pub struct StepRecorder(pub Vec<StepMetrics>);

impl Observer for StepRecorder {
    fn on_step(&mut self, metrics: &StepMetrics) {
        self.0.push(metrics.clone());
    }
}

/// Facts about a run, known once its data is loaded.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunInfo {
    pub backend: String,
    pub parameters: usize,
    pub total_steps: u64,
    pub start_step: u64,
    pub train: DataReport,
    pub eval: Option<DataReport>,
    pub output_dir: PathBuf,
}

/// The outcome of a finished run.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub steps: u64,
    pub final_loss: Option<f64>,
    pub final_eval: Option<EvalMetrics>,
    pub exported: PathBuf,
}

/// The embedded classic example, used when a config names no training file.
pub const CLASSIC_JSONL: &str = include_str!("../configs/classic.jsonl");

/// Runs a whole SFT job as `config` says, resuming from the checkpoint directory `resume` when
/// given, and exports the result to `<output_dir>/final`.
pub fn train<B>(
    config: &TrainConfig,
    device: &B::Device,
    backend_name: &str,
    resume: Option<&Path>,
    observer: &mut dyn Observer,
) -> Result<TrainSummary, TrainError>
where
    B: AutodiffBackend + ChunkedCeBackend + AttentionBackend,
    B::InnerBackend: ChunkedCeBackend + AttentionBackend + OptimizerBackend,
{
    let out = &config.output_dir;
    create_dir(out)?;
    write(&out.join("config.toml"), config.to_toml_string().as_bytes())?;

    // The model: from the checkpoint when resuming, else from its directory or preset.
    let base = match &config.model.path {
        Some(dir) => source::load_dir::<B>(dir, device)?,
        None => source::init_preset::<B>(&config.model.preset, config.model.init_seed, device)?,
    };
    let tokenizer = base.files.tokenizer()?;
    let (mut model, mut optimizer, mut state) = match resume {
        Some(ckpt) => {
            let restored = checkpoint::load::<B>(ckpt, config, device)?;
            (restored.model, restored.optimizer, restored.state)
        }
        None => (
            base.model,
            Optimizer::new(config.optim.optimizer),
            TrainerState::default(),
        ),
    };
    if config.train.precision == Precision::Bf16 {
        model = model.with_compute_dtype(DType::BF16);
        optimizer.keep_bf16_copies(true);
    }
    // An earlier run's copies (same process) are of parameters this run no longer has.
    #[cfg(feature = "cubecl")]
    qwen_gemm::copies::clear();
    model = model
        .with_attention_chunk_bytes(config.train.attention_chunk_mib << 20)
        .with_attention_impl(config.train.attention);

    // The data.
    let dataset_opts = DatasetOptions {
        mode: config.data.mask,
        max_len: config.data.max_len,
        policy: config.data.on_bad_line,
    };
    let (train_examples, train_report) =
        load_examples(&tokenizer, &config.data.train, &dataset_opts)?;
    let eval_set = if config.data.eval.is_empty() {
        None
    } else {
        Some(load_examples(&tokenizer, &config.data.eval, &dataset_opts)?)
    };
    let loader_config = LoaderConfig {
        batch_rows: config.train.batch_size,
        max_len: config.data.max_len,
        packing: config.data.packing,
        group_by_length: config.data.group_by_length,
        shuffle: config.data.shuffle,
        seed: config.train.seed,
        epochs: config.train.epochs,
        pad_id: tokenizer.pad_id(),
        ..LoaderConfig::default()
    };
    let mut loader = match &state.cursor {
        Some(cursor) => Loader::resume(train_examples, loader_config, cursor)?,
        None => Loader::new(train_examples, loader_config)?,
    };
    let accum = config.train.grad_accum;
    let total_steps = config
        .train
        .max_steps
        .unwrap_or_else(|| loader.total_batches().div_ceil(accum) as u64);
    if total_steps == 0 {
        return Err(TrainError::NoData(
            "the training data yields no batch".into(),
        ));
    }
    let schedule = Schedule::new(
        config.optim.schedule,
        config.optim.lr,
        config.optim.warmup_steps,
        config.optim.warmup_ratio,
        total_steps,
    );
    let loss_opts = CrossEntropyOptions::default()
        .with_reduction(Reduction::Sum)
        .with_label_smoothing(config.optim.label_smoothing)
        .with_z_loss_weight(config.optim.z_loss_weight)
        .with_chunk_memory_bytes(config.train.loss_chunk_mib << 20);

    observer.on_start(&RunInfo {
        backend: backend_name.to_string(),
        parameters: base.config.num_parameters(),
        total_steps,
        start_step: state.step,
        train: train_report,
        eval: eval_set.as_ref().map(|(_, r)| r.clone()),
        output_dir: out.clone(),
    });
    let mut metrics_log = MetricsLog::open(&out.join("metrics.jsonl"), state.step)?;
    let mut final_loss = None;
    let started = Instant::now();

    // Each step's loss and norm are read one step late: after the next step's forward and
    // backward passes are queued, so that the device goes on to them while the host reads,
    // logs and prepares the next batch (a read right after the update left the device idle
    // for that long, and for the ramp of queueing the next forward). The update of a step is
    // queued only after the previous step's values are read and found finite, so the model a
    // non-finite value leaves behind is the same as with reads in order.
    let mut pending: Option<PendingStep<B::InnerBackend>> = None;
    let mut last_finished = Instant::now();
    loop {
        let queued_step = state.step + u64::from(pending.is_some());
        let step_started = Instant::now();
        // One optimizer step: up to `accum` micro-batches.
        let micro: Vec<_> = if queued_step < total_steps {
            (0..accum).map_while(|_| loader.next_batch()).collect()
        } else {
            Vec::new()
        };
        let next = if micro.is_empty() {
            None
        } else {
            let batches: Vec<_> = micro.iter().map(|b| to_device::<B>(b, device)).collect();
            // transformers' num_items_in_batch: every micro-batch's summed loss is divided by
            // the supervised targets of the whole accumulated step.
            let supervised: usize = batches.iter().map(|b| b.supervised).sum();
            let tokens: usize = batches.iter().map(|b| b.tokens).sum();

            let mut accumulator = GradientsAccumulator::<Qwen2ForCausalLM<B>>::new();
            let mut step_loss: Option<Tensor<B::InnerBackend, 1>> = None;
            for batch in batches {
                // [rows, len, hidden]
                let hidden = model.hidden_states(&batch.input, None);
                let loss = lm_head_loss(&model, hidden, &batch.targets, &loss_opts)?
                    .normalized_by(supervised);
                step_loss = Some(match step_loss.take() {
                    Some(total) => total + loss.clone().inner(),
                    None => loss.clone().inner(),
                });
                let grads = GradientsParams::from_grads(loss.backward(), &model);
                accumulator.accumulate(&model, grads);
            }
            let queued_seconds = step_started.elapsed().as_secs_f64();
            Some((
                accumulator.grads(),
                step_loss,
                tokens,
                supervised,
                queued_seconds,
            ))
        };

        if let Some(done) = pending.take() {
            let (loss, grad_norm) = read_scalars(done.loss, done.norm);
            // A non-finite value ends the run; the update it made stays in memory only
            // (checkpoints on disk are from earlier steps, and the error names the last one).
            for (what, value) in [("loss", loss), ("gradient norm", grad_norm)] {
                if !value.is_finite() {
                    return Err(TrainError::NonFinite {
                        step: state.step + 1,
                        what,
                        value,
                        last_checkpoint: state.checkpoint,
                    });
                }
            }
            state.step += 1;
            state.tokens += done.tokens as u64;
            state.supervised_tokens += done.supervised as u64;
            state.cursor = Some(done.cursor);
            final_loss = Some(loss);
            // From the last step's read to this one's: the pace of the run, whichever of host
            // and device sets it.
            let step_seconds = last_finished.elapsed().as_secs_f64();
            last_finished = Instant::now();
            let metrics = StepMetrics {
                step: state.step,
                total_steps,
                loss,
                lr: done.lr,
                grad_norm,
                tokens: done.tokens,
                supervised_tokens: done.supervised,
                step_seconds,
                queued_seconds: done.queued_seconds,
                tokens_per_second: done.tokens as f64 / step_seconds,
                elapsed_seconds: started.elapsed().as_secs_f64(),
                epoch: done.cursor.epoch,
            };
            if state.step % config.train.log_every.max(1) == 0 || state.step == total_steps {
                metrics_log.step(&metrics)?;
            }
            observer.on_step(&metrics);

            if let Some((examples, _)) = &eval_set
                && config.eval.every > 0
                && state.step % config.eval.every == 0
                && state.step < total_steps
            {
                evaluate_and_log(
                    &model.valid(),
                    examples,
                    config,
                    state.step,
                    &mut metrics_log,
                    observer,
                )?;
            }
            if config.checkpoint.every > 0
                && state.step % config.checkpoint.every == 0
                && state.step < total_steps
            {
                let path = checkpoint::save(
                    out,
                    &model,
                    &base.config,
                    &optimizer,
                    &state,
                    config.checkpoint.keep_last,
                )?;
                state.checkpoint = Some(path.clone());
                observer.on_checkpoint(&path);
            }
        }

        let Some((mut grads, loss, tokens, supervised, queued_seconds)) = next else {
            break;
        };
        // The norm, clipping and the update are queued without reading anything back.
        let lr = schedule.lr(state.step);
        let norm;
        (model, norm) = optimizer.step(model, &mut grads, lr, config.optim.max_grad_norm);
        pending = Some(PendingStep {
            loss,
            norm,
            lr,
            tokens,
            supervised,
            queued_seconds,
            cursor: loader.cursor(),
        });
    }

    let final_eval = match &eval_set {
        Some((examples, _)) => Some(evaluate_and_log(
            &model.valid(),
            examples,
            config,
            state.step,
            &mut metrics_log,
            observer,
        )?),
        None => None,
    };
    let exported = out.join("final");
    if config.checkpoint.save_final {
        let path = checkpoint::save(
            out,
            &model,
            &base.config,
            &optimizer,
            &state,
            config.checkpoint.keep_last,
        )?;
        observer.on_checkpoint(&path);
        let final_model = LoadedModel {
            config: base.config.clone(),
            model: model.valid(),
            files: base.files.clone(),
            dir: None,
        };
        let export_opts = SaveOptions {
            dtype: config.checkpoint.export_dtype,
            max_shard_bytes: config.checkpoint.max_shard_bytes,
        };
        source::export(&final_model, &exported, &export_opts)?;
    }
    crate::plot::loss_curve(&out.join("metrics.jsonl"), &out.join("loss.png"))?;
    Ok(TrainSummary {
        steps: state.step,
        final_loss,
        final_eval,
        exported,
    })
}

/// The step's loss and gradient norm (0 for one that is absent), read back in one transfer.
/// A step whose update is queued and whose loss and gradient norm are not read yet.
struct PendingStep<B: Backend> {
    loss: Option<Tensor<B, 1>>,
    norm: Option<Tensor<B, 1>>,
    lr: f64,
    tokens: usize,
    supervised: usize,
    queued_seconds: f64,
    /// The loader's position after this step's batches.
    cursor: Cursor,
}

fn read_scalars<B: Backend>(loss: Option<Tensor<B, 1>>, norm: Option<Tensor<B, 1>>) -> (f64, f64) {
    let present: Vec<_> = [&loss, &norm]
        .into_iter()
        .flatten()
        .map(|t| t.clone().cast(DType::F32))
        .collect();
    if present.is_empty() {
        return (0.0, 0.0);
    }
    let values = Tensor::cat(present, 0)
        .into_data()
        .to_vec::<f32>()
        .expect("f32 scalars");
    let mut values = values.into_iter().map(f64::from);
    let mut take = |t: &Option<Tensor<B, 1>>| t.as_ref().map_or(0.0, |_| values.next().unwrap());
    let loss = take(&loss);
    (loss, take(&norm))
}

/// The loss of a batch from its final hidden states: the fused lm_head + cross-entropy against
/// the next-token targets, reduced as `opts` says (training sums, then normalises per step).
/// The targets stay on the host ([`DeviceBatch::targets`](crate::tensors::DeviceBatch)), so
/// the host queues the loss and the backward pass without waiting for the forward's end.
///
/// # Shapes
/// - hidden: `[rows, len, hidden]`
/// - targets: `[rows * len]`, shifted
pub fn lm_head_loss<B: ChunkedCeBackend>(
    model: &Qwen2ForCausalLM<B>,
    hidden: Tensor<B, 3>,
    targets: &[i64],
    opts: &CrossEntropyOptions,
) -> Result<LossOutput<B>, TrainError> {
    let [rows, len, width] = hidden.dims();
    // The master weight itself: the loss reads it cast on use, and its gradient comes back in
    // f32 with no cast (`chunked_lm_head_cross_entropy`).
    Ok(chunked_lm_head_cross_entropy(
        hidden.reshape([rows * len, width]),
        model.lm_head_weight(),
        targets,
        opts,
    )?)
}

/// Evaluates, then writes the metrics to the log and hands them to the observer.
fn evaluate_and_log<B: AttentionBackend>(
    model: &Qwen2ForCausalLM<B>,
    examples: &[Example],
    config: &TrainConfig,
    step: u64,
    log: &mut MetricsLog,
    observer: &mut dyn Observer,
) -> Result<EvalMetrics, TrainError> {
    let metrics = evaluate(model, examples, config, step)?;
    log.eval(&metrics)?;
    observer.on_eval(&metrics);
    Ok(metrics)
}

/// Reads and tokenizes the JSONL files, or the embedded classic example when there are none.
pub fn load_examples(
    tokenizer: &qwen_chat::ChatTokenizer,
    files: &[PathBuf],
    opts: &DatasetOptions,
) -> Result<(Vec<Example>, DataReport), TrainError> {
    let dataset = if files.is_empty() {
        let mut report = DataReport::default();
        let chats = qwen_chat::parse_jsonl(
            CLASSIC_JSONL.as_bytes(),
            "<embedded classic.jsonl>",
            opts.policy,
            &mut report,
        )?;
        let examples = tokenizer.tokenize_chats(&chats, opts, &mut report)?;
        qwen_chat::Dataset { examples, report }
    } else {
        tokenizer.build_dataset(files, opts)?
    };
    if dataset.examples.is_empty() {
        return Err(TrainError::NoData(format!(
            "{} read, none kept",
            dataset.report.examples_read
        )));
    }
    Ok((dataset.examples, dataset.report))
}

pub(crate) fn create_dir(path: &Path) -> Result<(), TrainError> {
    std::fs::create_dir_all(path).map_err(|source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    })
}

pub(crate) fn write(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    std::fs::write(path, bytes).map_err(|source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    })
}
