//! `qwen-sft`: supervised fine-tuning of Qwen2-family chat models.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use qwen_chat::{
    Chat, ChatTokenizer, DatasetOptions, InspectOptions, MaskMode, Message, SkipPolicy,
};
use qwen_model::linear::GemmBody;
use qwen_model::{SaveDtype, SaveOptions};
use qwen_sft::backend::{self, BACKEND_NAME, Inference, Training, TrainingCheckpointed};
use qwen_sft::config::{Checkpointing, Precision, TrainConfig};
use qwen_sft::eval::{evaluate, score_examples};
use qwen_sft::generate::{GenerationConfig, generate};
use qwen_sft::metrics::StepMetrics;
use qwen_sft::source::{self, LoadedModel};
use qwen_sft::train::{Observer, RunInfo, load_examples};

#[derive(Parser)]
#[command(
    name = "qwen-sft",
    version,
    about = "Supervised fine-tuning of Qwen2-family chat models on burn"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Every matrix product (linear layers, attention, loss): cublaslt (cuBLASLt on burn's
    /// stream), cublaslt-cached (the same with each shape's setup made once; not yet run on a
    /// GPU), cublaslt-host-sync or burn (burn's matmul). Only a CUDA build has a choice; every
    /// other backend runs burn's matmul.
    #[arg(long, global = true, default_value = "cublaslt")]
    gemm: GemmBody,
    /// Products smaller than this many GFLOP stay on burn's matmul whatever `--gemm` says
    /// (cuBLASLt pays host syncs per product, more than a small product takes).
    #[arg(long, global = true, default_value_t = qwen_gemm::DEFAULT_MIN_FLOPS as f64 * 1e-9)]
    gemm_min_gflop: f64,
    /// This workspace's own kernels (the attention's block softmax, the rotary embedding,
    /// RMSNorm, the embedding's gradient, SwiGLU's backward, the biases' and norm weights'
    /// gradients, the chunked loss's row statistics and logit gradient):
    /// auto (the kernels on CUDA, tensor ops elsewhere), tensor-ops (burn's ops everywhere) or
    /// kernel (on any CubeCL backend, wgpu too).
    #[arg(long, global = true, default_value = "auto")]
    kernels: qwen_model::KernelBody,
    /// Kernels to keep on their tensor-op bodies whatever `--kernels` says, comma-separated:
    /// softmax, rotary, rms-norm, flash, embedding, swiglu, column-sums, adamw, bf16-copies (to
    /// find which one a difference comes from).
    #[arg(long, global = true, value_delimiter = ',')]
    kernels_off: Vec<qwen_model::Kernel>,
}

#[derive(Subcommand)]
enum Command {
    /// A full SFT run. With no config and no model/data flags: the embedded demo.
    Train(TrainArgs),
    /// Loss, perplexity and token accuracy on a JSONL file.
    Eval(DataArgs),
    /// One JSON line per example: {"index", "loss_sum", "n_tokens"} under the masking mode.
    Score(DataArgs),
    /// Generate a reply to one prompt.
    Generate(GenerateArgs),
    /// Talk to a model, with its chat template.
    Chat(ChatArgs),
    /// Rendered chats with supervised spans marked, plus dataset statistics.
    Inspect(InspectArgs),
    /// Write a random-init model directory from a size preset, with the bundled tokenizer.
    Init(InitArgs),
    /// Write a Hugging Face model directory from a model directory or a training checkpoint.
    Export(ExportArgs),
    /// The training benchmark: tokens/s and step time as JSON.
    Bench(BenchArgs),
    /// Time the forward pass of a preset on random tokens, as JSON.
    BenchForward(BenchForwardArgs),
    /// The linear layers' GEMMs of a preset on the backend's body and on burn's matmul: one JSON
    /// line each with both times and their largest difference.
    BenchLinear(BenchLinearArgs),
    /// The fast path (chunked attention, fused loss) against the reference on one packed batch:
    /// logits, loss and gradients as JSON; fails beyond the tolerance.
    CheckFastPath(CheckArgs),
    /// The attention alone at a model's sizes: the fused kernels (CUDA) against the chunked
    /// attention and f32, output and gradients as JSON; fails beyond the tolerance or when the
    /// fused kernels did not run.
    CheckAttention(CheckAttentionArgs),
}

#[derive(Args)]
struct CheckAttentionArgs {
    #[arg(long, default_value_t = 2)]
    batch_size: usize,
    /// Query heads (14 in Qwen2.5-0.5B, 12 in 1.5B).
    #[arg(long, default_value_t = 14)]
    heads: usize,
    #[arg(long, default_value_t = 2)]
    kv_heads: usize,
    #[arg(long, default_value_t = 2048)]
    seq_len: usize,
    /// 64 (0.5B) or 128 (1.5B and up).
    #[arg(long, default_value_t = 64)]
    head_dim: usize,
    #[arg(long, default_value_t = 3e-2)]
    tolerance: f64,
    /// Also time each bf16 path (forward + backward) over this many runs (a benchmark, in the
    /// JSON); 0: no timing.
    #[arg(long, default_value_t = 0)]
    iterations: usize,
}

#[derive(Args)]
struct CheckArgs {
    /// Hugging Face model directory; without a tokenizer.json the bundled Qwen2.5 one is used.
    #[arg(long)]
    model: PathBuf,
    /// Chats JSONL; a few built-in chats when absent.
    #[arg(long)]
    data: Option<PathBuf>,
    /// f32 | bf16
    #[arg(long, default_value = "f32")]
    precision: Precision,
    #[arg(long, default_value_t = 2)]
    batch_size: usize,
    #[arg(long, default_value_t = 64)]
    max_len: usize,
    /// Relative; 1e-4 for f32, 3e-2 for bf16 when absent (f32 on CUDA runs TF32 matmuls, which
    /// may need a looser one).
    #[arg(long)]
    tolerance: Option<f64>,
}

#[derive(Args)]
struct BenchForwardArgs {
    #[arg(long, default_value = "0.5b")]
    preset: String,
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
    #[arg(long, default_value_t = 2048)]
    seq_len: usize,
    #[arg(long, default_value = "f32")]
    precision: Precision,
    #[arg(long, default_value_t = 5)]
    iterations: usize,
}

#[derive(Args)]
struct BenchLinearArgs {
    #[arg(long, default_value = "0.5b")]
    preset: String,
    /// Tokens in the batch (batch x sequence length).
    #[arg(long, default_value_t = 8192)]
    rows: usize,
    #[arg(long, default_value = "bf16")]
    precision: Precision,
    #[arg(long, default_value_t = 10)]
    iterations: usize,
}

#[derive(Args)]
struct TrainArgs {
    /// TOML config file; flags below override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Hugging Face model directory to fine-tune.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Size preset to initialise at random instead (tiny, 0.5b, 1.5b, 7b).
    #[arg(long)]
    preset: Option<String>,
    /// Training JSONL (repeatable).
    #[arg(long)]
    data: Vec<PathBuf>,
    /// Evaluation JSONL (repeatable).
    #[arg(long)]
    eval_data: Vec<PathBuf>,
    #[arg(long)]
    output: Option<PathBuf>,
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long)]
    epochs: Option<usize>,
    #[arg(long)]
    max_steps: Option<u64>,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    grad_accum: Option<usize>,
    #[arg(long)]
    max_len: Option<usize>,
    /// assistant | qwen | last | all
    #[arg(long)]
    mask: Option<MaskMode>,
    /// Pack chats into rows instead of padding.
    #[arg(long)]
    pack: bool,
    /// f32 | bf16
    #[arg(long)]
    precision: Option<Precision>,
    #[arg(long)]
    seed: Option<u64>,
    /// Any config value: `--set optim.schedule=cosine` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Continue from a checkpoint directory, or from the newest checkpoint of a run directory.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// No progress bar (metrics still go to metrics.jsonl).
    #[arg(long)]
    quiet: bool,
    /// Print the resolved configuration as TOML and exit without training.
    #[arg(long)]
    print_config: bool,
}

#[derive(Args)]
struct DataArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long, required = true)]
    data: Vec<PathBuf>,
    #[arg(long, default_value = "assistant")]
    mask: MaskMode,
    #[arg(long, default_value_t = 2048)]
    max_len: usize,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// fail | skip
    #[arg(long, default_value = "fail", value_parser = parse_policy)]
    on_bad_line: SkipPolicy,
}

#[derive(Args)]
struct SamplingArgs {
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// Greedy decoding, whatever generation_config.json says.
    #[arg(long)]
    greedy: bool,
    #[arg(long)]
    temperature: Option<f64>,
    #[arg(long)]
    top_p: Option<f64>,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long)]
    repetition_penalty: Option<f64>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args)]
struct GenerateArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    prompt: String,
    /// A system message (without one the template may insert its default).
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    sampling: SamplingArgs,
}

#[derive(Args)]
struct ChatArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    sampling: SamplingArgs,
}

#[derive(Args)]
struct InspectArgs {
    /// Model directory whose tokenizer to use; the bundled Qwen2.5 tokenizer when absent.
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, required = true)]
    data: Vec<PathBuf>,
    #[arg(long, default_value = "assistant")]
    mask: MaskMode,
    #[arg(long, default_value_t = 2048)]
    max_len: usize,
    /// Examples shown in full.
    #[arg(long, default_value_t = 3)]
    show: usize,
}

#[derive(Args)]
struct InitArgs {
    #[arg(long)]
    preset: String,
    #[arg(long)]
    output: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// f32 | bf16 | f16
    #[arg(long, default_value = "bf16")]
    dtype: SaveDtype,
}

#[derive(Args)]
struct ExportArgs {
    /// A model directory, or a checkpoint (`<run>/checkpoints/step-N`) whose `model/` to take.
    #[arg(long)]
    from: PathBuf,
    #[arg(long)]
    output: PathBuf,
    #[arg(long, default_value = "bf16")]
    dtype: SaveDtype,
    /// Shard above this many bytes.
    #[arg(long, default_value_t = 5_000_000_000)]
    max_shard_bytes: u64,
}

#[derive(Args)]
struct BenchArgs {
    #[arg(long, default_value = "tiny")]
    preset: String,
    #[arg(long, default_value_t = 2048)]
    seq_len: usize,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[arg(long, default_value_t = 20)]
    steps: u64,
    #[arg(long, default_value_t = 3)]
    warmup_steps: u64,
    #[arg(long, default_value = "f32")]
    precision: Precision,
    #[arg(long, default_value_t = 1024)]
    loss_chunk_mib: usize,
    #[arg(long, default_value_t = 1024)]
    attention_chunk_mib: usize,
    /// chunked | reference
    #[arg(long, default_value = "chunked")]
    attention: qwen_model::AttentionImpl,
    /// none | balanced: what autodiff stores for the backward (`train.checkpointing`).
    #[arg(long, default_value = "none")]
    checkpointing: Checkpointing,
    /// Scratch directory for the corpus and the run (a temporary one when absent).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Write samples of the host's time over the timed steps here, as collapsed stacks
    /// (a binary built with `--features host-profile`).
    #[arg(long)]
    host_profile: Option<PathBuf>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    qwen_model::linear::set_gemm_body(cli.gemm);
    anyhow::ensure!(
        cli.gemm_min_gflop >= 0.0,
        "--gemm-min-gflop must be at least 0, not {}",
        cli.gemm_min_gflop
    );
    qwen_gemm::set_gemm_min_flops((cli.gemm_min_gflop * 1e9) as u64);
    qwen_sft::bench::set_kernel_bodies(cli.kernels);
    qwen_model::set_kernels_off(&cli.kernels_off);
    match cli.command {
        Command::Train(args) => train(args),
        Command::Eval(args) => eval(args),
        Command::Score(args) => score(args),
        Command::Generate(args) => generate_once(args),
        Command::Chat(args) => chat(args),
        Command::Inspect(args) => inspect(args),
        Command::Init(args) => init(args),
        Command::Export(args) => export(args),
        Command::Bench(args) => bench(args),
        Command::BenchForward(args) => {
            let report = qwen_sft::bench::forward::<Inference>(
                &args.preset,
                args.batch_size,
                args.seq_len,
                args.precision,
                args.iterations,
                &backend::device(),
                BACKEND_NAME,
            )?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
        Command::BenchLinear(args) => {
            let reports = qwen_sft::bench::linear::<Inference>(
                &args.preset,
                args.rows,
                args.precision,
                args.iterations,
                &backend::device(),
            )?;
            for report in reports {
                println!("{}", serde_json::to_string(&report)?);
            }
            Ok(())
        }
        Command::CheckFastPath(args) => check_fast_path(args),
        Command::CheckAttention(args) => check_attention(args),
    }
}

fn parse_policy(s: &str) -> Result<SkipPolicy, String> {
    match s {
        "fail" => Ok(SkipPolicy::Fail),
        "skip" => Ok(SkipPolicy::Skip),
        other => Err(format!("`{other}`: use fail or skip")),
    }
}

fn resolve_config(args: &TrainArgs) -> Result<TrainConfig> {
    let uses_defaults = args.config.is_none()
        && args.model.is_none()
        && args.preset.is_none()
        && args.data.is_empty();
    let mut config = match &args.config {
        Some(path) => TrainConfig::from_file(path)?,
        None if uses_defaults => TrainConfig::demo(),
        None => TrainConfig::default(),
    };
    if let Some(model) = &args.model {
        config.model.path = Some(model.clone());
    }
    if let Some(preset) = &args.preset {
        config.model.path = None;
        config.model.preset = preset.clone();
    }
    if !args.data.is_empty() {
        config.data.train = args.data.clone();
    }
    if !args.eval_data.is_empty() {
        config.data.eval = args.eval_data.clone();
    }
    if let Some(v) = &args.output {
        config.output_dir = v.clone();
    }
    if let Some(v) = args.lr {
        config.optim.lr = v;
    }
    if let Some(v) = args.epochs {
        config.train.epochs = v;
    }
    if let Some(v) = args.max_steps {
        config.train.max_steps = Some(v);
    }
    if let Some(v) = args.batch_size {
        config.train.batch_size = v;
    }
    if let Some(v) = args.grad_accum {
        config.train.grad_accum = v;
    }
    if let Some(v) = args.max_len {
        config.data.max_len = v;
    }
    if let Some(v) = args.mask {
        config.data.mask = v;
    }
    if args.pack {
        config.data.packing = true;
    }
    if let Some(v) = args.precision {
        config.train.precision = v;
    }
    if let Some(v) = args.seed {
        config.train.seed = v;
    }
    for assignment in &args.sets {
        config.set(assignment)?;
    }
    config
        .validate()
        .map_err(|reason| anyhow::anyhow!("bad configuration: {reason}"))?;
    Ok(config)
}

/// Progress bar and summaries on stderr.
struct Progress {
    bar: Option<ProgressBar>,
}

impl Observer for Progress {
    fn on_start(&mut self, info: &RunInfo) {
        eprintln!(
            "qwen-sft: backend {}, {:.1}M parameters, {} steps (from step {}), output {}",
            info.backend,
            info.parameters as f64 / 1e6,
            info.total_steps,
            info.start_step,
            info.output_dir.display()
        );
        eprintln!("train data: {}", info.train);
        if let Some(eval) = &info.eval {
            eprintln!("eval data: {}", eval);
        }
        if let Some(bar) = &self.bar {
            bar.set_length(info.total_steps);
            bar.set_position(info.start_step);
        }
    }

    fn on_step(&mut self, m: &StepMetrics) {
        if let Some(bar) = &self.bar {
            bar.set_position(m.step);
            bar.set_message(format!(
                "loss {:.4}  lr {:.2e}  |g| {:.3}  {:.0} tok/s",
                m.loss, m.lr, m.grad_norm, m.tokens_per_second
            ));
        }
    }

    fn on_eval(&mut self, m: &qwen_sft::eval::EvalMetrics) {
        let line = format!(
            "eval @ step {}: loss {:.4}  ppl {:.3}  accuracy {:.4}  ({} tokens)",
            m.step, m.loss, m.perplexity, m.accuracy, m.supervised_tokens
        );
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    fn on_checkpoint(&mut self, path: &Path) {
        let line = format!("checkpoint: {}", path.display());
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }
}

fn train(args: TrainArgs) -> Result<()> {
    let config = resolve_config(&args)?;
    if args.print_config {
        print!("{}", config.to_toml_string());
        return Ok(());
    }
    let bar = (!args.quiet).then(|| {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
            )
            .expect("valid template"),
        );
        bar
    });
    let mut progress = Progress { bar };
    let (device, resume) = (backend::device(), args.resume.as_deref());
    // The checkpointing strategy is part of the backend's type.
    let summary = match config.train.checkpointing {
        Checkpointing::None => {
            qwen_sft::train::<Training>(&config, &device, BACKEND_NAME, resume, &mut progress)
        }
        Checkpointing::Balanced => qwen_sft::train::<TrainingCheckpointed>(
            &config,
            &device,
            BACKEND_NAME,
            resume,
            &mut progress,
        ),
    }
    .with_context(|| format!("training into {}", config.output_dir.display()))?;
    if let Some(bar) = &progress.bar {
        bar.finish();
    }
    eprintln!(
        "done: {} steps, final loss {:.4}; model exported to {}; loss curve {}",
        summary.steps,
        summary.final_loss.unwrap_or(f64::NAN),
        summary.exported.display(),
        config.output_dir.join("loss.png").display()
    );
    Ok(())
}

fn load_inference(dir: &Path) -> Result<LoadedModel<Inference>> {
    source::load_dir::<Inference>(dir, &backend::device())
        .with_context(|| format!("loading the model {}", dir.display()))
}

fn examples_for(args: &DataArgs, tokenizer: &ChatTokenizer) -> Result<Vec<qwen_chat::Example>> {
    let opts = DatasetOptions {
        mode: args.mask,
        max_len: args.max_len,
        policy: args.on_bad_line,
    };
    let (examples, report) = load_examples(tokenizer, &args.data, &opts)?;
    eprintln!("data: {}", report);
    Ok(examples)
}

fn eval(args: DataArgs) -> Result<()> {
    let loaded = load_inference(&args.model)?;
    let examples = examples_for(&args, &loaded.files.tokenizer()?)?;
    let mut config = TrainConfig::default();
    config.eval.batch_size = args.batch_size;
    config.data.max_len = args.max_len;
    let metrics = evaluate(&loaded.model, &examples, &config, 0)?;
    println!("{}", serde_json::to_string(&metrics)?);
    Ok(())
}

fn score(args: DataArgs) -> Result<()> {
    let loaded = load_inference(&args.model)?;
    let examples = examples_for(&args, &loaded.files.tokenizer()?)?;
    let scores = score_examples(
        &loaded.model,
        &examples,
        args.batch_size,
        args.max_len,
        256 << 20,
    )?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for s in scores {
        writeln!(out, "{}", serde_json::to_string(&s)?)?;
    }
    Ok(())
}

fn generation_config(
    loaded: &LoadedModel<Inference>,
    args: &SamplingArgs,
) -> Result<GenerationConfig> {
    let mut generation = GenerationConfig::from_json(&loaded.files.generation_config_json)
        .context("reading generation_config.json")?;
    if args.greedy {
        generation = generation.greedy();
    }
    if let Some(v) = args.max_new_tokens {
        generation.max_new_tokens = v;
    }
    if let Some(v) = args.temperature {
        generation.temperature = v;
    }
    if let Some(v) = args.top_p {
        generation.top_p = v;
    }
    if let Some(v) = args.top_k {
        generation.top_k = v;
    }
    if let Some(v) = args.repetition_penalty {
        generation.repetition_penalty = v;
    }
    Ok(generation)
}

/// Generates a reply to `messages`, printing it as it comes; returns the text.
fn reply(
    loaded: &LoadedModel<Inference>,
    tokenizer: &ChatTokenizer,
    messages: Vec<Message>,
    generation: &GenerationConfig,
    seed: u64,
) -> Result<String> {
    let prompt = tokenizer.encode_prompt(&Chat::new(messages))?;
    let ids = generate(
        &loaded.model,
        &loaded.config,
        &prompt,
        generation,
        &tokenizer.stop_ids(),
        tokenizer.vocab_size(),
        seed,
        |_| {},
    );
    Ok(tokenizer.decode(&ids, true)?)
}

fn generate_once(args: GenerateArgs) -> Result<()> {
    let loaded = load_inference(&args.model)?;
    let tokenizer = loaded.files.tokenizer()?;
    let generation = generation_config(&loaded, &args.sampling)?;
    let mut messages = Vec::new();
    if let Some(system) = args.system {
        messages.push(Message::system(system));
    }
    messages.push(Message::user(args.prompt));
    println!(
        "{}",
        reply(
            &loaded,
            &tokenizer,
            messages,
            &generation,
            args.sampling.seed
        )?
    );
    Ok(())
}

fn chat(args: ChatArgs) -> Result<()> {
    let loaded = load_inference(&args.model)?;
    let tokenizer = loaded.files.tokenizer()?;
    let generation = generation_config(&loaded, &args.sampling)?;
    let mut messages: Vec<Message> = args.system.into_iter().map(Message::system).collect();
    eprintln!("qwen-sft chat ({BACKEND_NAME}); an empty line or Ctrl-D ends it.");
    let stdin = std::io::stdin();
    let mut turn = 0u64;
    loop {
        eprint!("> ");
        std::io::stderr().flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            return Ok(());
        }
        messages.push(Message::user(line.trim_end_matches(['\n', '\r'])));
        let answer = reply(
            &loaded,
            &tokenizer,
            messages.clone(),
            &generation,
            args.sampling.seed + turn,
        )?;
        println!("{answer}");
        messages.push(Message::assistant(answer));
        turn += 1;
    }
}

fn inspect(args: InspectArgs) -> Result<()> {
    let tokenizer = match &args.model {
        Some(dir) => source::TokenizerFiles::from_dir(dir)?.tokenizer()?,
        None => ChatTokenizer::bundled()?,
    };
    let opts = InspectOptions {
        mode: args.mask,
        max_len: args.max_len,
        show: args.show,
        ..Default::default()
    };
    let report = tokenizer.inspect_files(&args.data, &opts)?;
    println!("{report}");
    Ok(())
}

fn init(args: InitArgs) -> Result<()> {
    let loaded = source::init_preset::<Inference>(&args.preset, args.seed, &backend::device())?;
    let opts = SaveOptions {
        dtype: args.dtype,
        ..Default::default()
    };
    source::export(&loaded, &args.output, &opts)?;
    eprintln!(
        "wrote a random {} model ({} parameters) to {}",
        args.preset,
        loaded.config.num_parameters(),
        args.output.display()
    );
    Ok(())
}

fn export(args: ExportArgs) -> Result<()> {
    let (model_dir, files_dir) = if args.from.join("state.json").exists() {
        // A training checkpoint: the weights are in model/, the tokenizer files beside the run.
        let run = args
            .from
            .parent()
            .and_then(Path::parent)
            .context("a checkpoint lives in <run>/checkpoints/")?;
        (args.from.join("model"), run.join("final"))
    } else {
        (args.from.clone(), args.from.clone())
    };
    let files = source::TokenizerFiles::from_dir(&files_dir)
        .or_else(|_| source::TokenizerFiles::from_dir(&model_dir))
        .with_context(|| {
            format!(
                "no tokenizer.json in {} or {}",
                files_dir.display(),
                model_dir.display()
            )
        })?;
    let (config, model) = qwen_model::load_pretrained::<Inference>(
        &model_dir,
        &backend::device(),
        burn::tensor::DType::F32,
    )?;
    let loaded = LoadedModel {
        config,
        model,
        files,
        dir: Some(model_dir),
    };
    source::export(
        &loaded,
        &args.output,
        &SaveOptions {
            dtype: args.dtype,
            max_shard_bytes: args.max_shard_bytes,
        },
    )?;
    eprintln!("exported to {}", args.output.display());
    Ok(())
}

fn bench(args: BenchArgs) -> Result<()> {
    let temp;
    let work_dir = match &args.work_dir {
        Some(dir) => dir.clone(),
        None => {
            temp = std::env::temp_dir().join(format!("qwen-sft-bench-{}", std::process::id()));
            temp
        }
    };
    std::fs::create_dir_all(&work_dir)?;
    let bench = qwen_sft::bench::BenchConfig {
        preset: args.preset,
        seq_len: args.seq_len,
        batch_size: args.batch_size,
        steps: args.steps,
        warmup_steps: args.warmup_steps,
        precision: args.precision,
        loss_chunk_mib: args.loss_chunk_mib,
        attention_chunk_mib: args.attention_chunk_mib,
        attention: args.attention,
        checkpointing: args.checkpointing,
        host_profile: args.host_profile,
    };
    let device = backend::device();
    let report = match args.checkpointing {
        Checkpointing::None => {
            qwen_sft::bench::run::<Training>(&bench, &device, BACKEND_NAME, &work_dir)?
        }
        Checkpointing::Balanced => {
            qwen_sft::bench::run::<TrainingCheckpointed>(&bench, &device, BACKEND_NAME, &work_dir)?
        }
    };
    if args.work_dir.is_none() {
        let _ = std::fs::remove_dir_all(&work_dir);
    }
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

fn check_attention(args: CheckAttentionArgs) -> Result<()> {
    let shape = qwen_sft::check_attention::AttentionShape {
        batch: args.batch_size,
        heads: args.heads,
        kv_heads: args.kv_heads,
        seq: args.seq_len,
        head_dim: args.head_dim,
    };
    anyhow::ensure!(
        shape.kv_heads > 0 && shape.heads.is_multiple_of(shape.kv_heads),
        "--heads {} is not a multiple of --kv-heads {}",
        shape.heads,
        shape.kv_heads
    );
    let report = qwen_sft::check_attention::check_attention::<Training>(
        shape,
        args.tolerance,
        args.iterations,
        BACKEND_NAME,
        &backend::device(),
    );
    println!("{}", serde_json::to_string(&report)?);
    anyhow::ensure!(
        report.fused_passes == 2,
        "the fused attention did not run ({} of 2 passes): it runs on CUDA, in bf16, for head sizes 64 and 128",
        report.fused_passes
    );
    anyhow::ensure!(
        report.pass,
        "the fused attention differs from the chunked one by more than {} (relative), and is farther from f32",
        args.tolerance
    );
    Ok(())
}

fn check_fast_path(args: CheckArgs) -> Result<()> {
    let files = if args.model.join("tokenizer.json").exists() {
        source::TokenizerFiles::from_dir(&args.model)?
    } else {
        source::TokenizerFiles::bundled()
    };
    let batch = qwen_sft::check::first_batch(
        &files.tokenizer()?,
        args.data.as_deref(),
        args.batch_size,
        args.max_len,
    )?;
    let (config, model) = qwen_model::load_pretrained::<Training>(
        &args.model,
        &backend::device(),
        burn::tensor::DType::F32,
    )
    .with_context(|| format!("loading the model {}", args.model.display()))?;
    let tolerance = args
        .tolerance
        .unwrap_or_else(|| qwen_sft::check::default_tolerance(args.precision));
    let report = qwen_sft::check::check_fast_path(
        model,
        &config,
        &batch,
        args.precision,
        tolerance,
        BACKEND_NAME,
    )?;
    println!("{}", serde_json::to_string(&report)?);
    anyhow::ensure!(
        report.pass,
        "the fast path differs from the reference by more than {tolerance} (relative)"
    );
    Ok(())
}
