//! `cargo xtask`: the project's entry points.
//!
//! ```text
//! cargo xtask train [--backend cpu|wgpu|cuda] [-- <qwen-sft train args>]
//! cargo xtask bench [--backend cpu|wgpu|cuda] [-- <qwen-sft bench args>]
//! cargo xtask bench-tokenize [--chats N]
//! cargo xtask bench-loss [-- <bench_loss_cuda args>]      (CUDA)
//! cargo xtask bench-cpu                                     (ndarray against flex)
//! cargo xtask device-bundle                                 (release binaries for the GPU box)
//! cargo xtask fixtures                                      (regenerate fixtures; needs Python)
//! ```
//!
//! `cargo xtask train` with no arguments is the embedded demo: a tiny random Qwen2 with the
//! bundled tokenizer learns the classic example on the CPU, then answers "2+2等于几" greedily,
//! which must give "2+2等于5。".

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

const DEMO_PROMPT: &str = "2+2等于几";
const DEMO_SYSTEM: &str = "You are a helpful assistant.";
const DEMO_ANSWER: &str = "2+2等于5。";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (task, rest) = args
        .split_first()
        .map_or(("help", &[][..]), |(t, r)| (t.as_str(), r));
    match task {
        "train" => train(rest),
        "bench" => bench(rest),
        "bench-tokenize" => bench_tokenize(rest),
        "bench-loss" => bench_loss(rest),
        "bench-cpu" => run(cargo().args([
            "run",
            "--release",
            "-p",
            "qwen-model",
            "--example",
            "cpu_backends",
        ])),
        "device-bundle" => device_bundle(rest),
        "fixtures" => fixtures(),
        _ => {
            eprintln!(
                "usage: cargo xtask <task>\n\n  train [--backend cpu|wgpu|cuda] [-- <qwen-sft train args>]\n  bench [--backend cpu|wgpu|cuda] [-- <qwen-sft bench args>]\n  bench-tokenize [--chats N]\n  bench-loss [-- args]\n  bench-cpu\n  device-bundle [--features F]\n  fixtures"
            );
            if task == "help" || task == "--help" {
                Ok(())
            } else {
                bail!("unknown task `{task}`")
            }
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace")
        .to_path_buf()
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// `--backend X` out of the arguments, and what follows `--`.
fn split_backend(args: &[String]) -> Result<(String, Vec<String>)> {
    let mut backend = "cpu".to_string();
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--backend" => backend = it.next().context("--backend needs a value")?.clone(),
            "--" => {
                rest.extend(it.by_ref().cloned());
            }
            other => bail!("unexpected `{other}`; pass qwen-sft arguments after `--`"),
        }
    }
    if !["cpu", "wgpu", "cuda"].contains(&backend.as_str()) {
        bail!("unknown backend `{backend}`; use cpu, wgpu or cuda");
    }
    Ok((backend, rest))
}

/// Builds `qwen-sft` in release mode with the backend's feature and returns the binary.
fn build_qwen_sft(backend: &str) -> Result<PathBuf> {
    build_qwen_sft_in(backend, backend)
}

/// Builds with `features` in `target/<target_dir>`, so that feature variants of one backend
/// share their compiled dependencies.
fn build_qwen_sft_in(features: &str, target_dir: &str) -> Result<PathBuf> {
    let target = root().join("target").join(target_dir);
    run(cargo()
        .args([
            "build",
            "--release",
            "-p",
            "qwen-sft",
            "--no-default-features",
            "--features",
            features,
        ])
        .env("CARGO_TARGET_DIR", &target))?;
    Ok(target.join("release").join("qwen-sft"))
}

fn train(args: &[String]) -> Result<()> {
    let (backend, rest) = split_backend(args)?;
    let bin = build_qwen_sft(&backend)?;
    if !rest.is_empty() {
        let mut cmd = Command::new(&bin);
        cmd.arg("train").args(&rest);
        return run(&mut cmd);
    }
    // The embedded demo, then its question.
    run(Command::new(&bin).current_dir(root()).arg("train"))?;
    let output = Command::new(&bin)
        .current_dir(root())
        .args([
            "generate",
            "--model",
            "runs/demo/final",
            "--system",
            DEMO_SYSTEM,
            "--prompt",
            DEMO_PROMPT,
            "--greedy",
        ])
        .output()
        .context("running qwen-sft generate")?;
    if !output.status.success() {
        bail!(
            "qwen-sft generate failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let answer = String::from_utf8(output.stdout)?
        .trim_end_matches('\n')
        .to_string();
    println!("user: {DEMO_PROMPT}\nassistant: {answer}");
    if answer != DEMO_ANSWER {
        bail!("the demo should answer {DEMO_ANSWER:?}, it answered {answer:?}");
    }
    println!("The model learned exactly what its labels said.");
    Ok(())
}

fn bench(args: &[String]) -> Result<()> {
    let (backend, rest) = split_backend(args)?;
    let bin = build_qwen_sft(&backend)?;
    run(Command::new(&bin).arg("bench").args(&rest))
}

fn bench_tokenize(args: &[String]) -> Result<()> {
    let mut chats = 100_000;
    let mut corpus = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--chats" => chats = it.next().context("--chats takes a number")?.parse()?,
            "--write-corpus" => {
                corpus = Some(PathBuf::from(
                    it.next().context("--write-corpus takes a path")?,
                ))
            }
            other => bail!(
                "unexpected `{other}`; usage: cargo xtask bench-tokenize [--chats N] [--write-corpus FILE]"
            ),
        }
    }
    if let Some(path) = corpus {
        // The same chats the benchmark tokenizes, as JSONL, for the transformers peer
        // (xtask/peer/tokenize_peer.py).
        let mut out = String::new();
        for chat in qwen_chat::synthetic_chats(chats, qwen_chat::BENCH_SEED) {
            out.push_str(&serde_json::json!({ "messages": chat.messages }).to_string());
            out.push('\n');
        }
        std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
    }
    let report = qwen_chat::bench_tokenize(chats)?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

fn bench_loss(args: &[String]) -> Result<()> {
    let rest: Vec<&String> = args.iter().skip_while(|a| *a == "--").collect();
    run(cargo()
        .args([
            "run",
            "--release",
            "-p",
            "qwen-loss",
            "--example",
            "bench_loss_cuda",
            "--features",
            "bench-cuda",
            "--",
        ])
        .args(rest))
}

/// The CUDA build of `qwen-sft` for the lent GPU machine (which has no Rust toolchain):
/// stripped and xz-compressed into `.device/qwen-sft.xz`, since the working tree sent there is
/// capped at 64 MiB. `.gitignore` keeps `.device/` out of git (so the device tool takes it only
/// when `carry` names it);
/// `xtask/device/gpu_bench.sh` unpacks it there (`BINARY=qwen-sft-<features>` picks a variant).
///
/// `--features F` builds another CUDA variant (`cuda-unfused`, `cuda,autotune`,
/// `cuda,host-profile`, which keeps its symbols) into `.device/qwen-sft-<F>.xz`, in the same
/// target folder as the plain build.
fn device_bundle(args: &[String]) -> Result<()> {
    let features = match args {
        [] => "cuda".to_string(),
        [flag, features] if flag == "--features" => features.clone(),
        _ => bail!("usage: cargo xtask device-bundle [--features F]"),
    };
    let name = match features.as_str() {
        "cuda" => "qwen-sft".to_string(),
        other => format!("qwen-sft-{}", other.replace(',', "-")),
    };
    let out = root().join(".device");
    std::fs::create_dir_all(&out)?;
    let bin = build_qwen_sft_in(&features, "cuda")?;
    let stripped = out.join(&name);
    std::fs::copy(&bin, &stripped)?;
    // A host-profiling build keeps its symbol table: its samples name functions by it.
    let strip_what = if features.contains("host-profile") {
        "--strip-debug"
    } else {
        "--strip-all"
    };
    run(Command::new("strip").arg(strip_what).arg(&stripped))?;
    run(Command::new("xz").args(["-T2", "-6", "-f"]).arg(&stripped))?;
    println!("{}", out.join(format!("{name}.xz")).display());
    Ok(())
}

fn fixtures() -> Result<()> {
    for script in [
        "tests/fixtures/model/generate.py",
        "tests/fixtures/loss/generate.py",
        "tests/fixtures/chat/generate.py",
    ] {
        run(Command::new("python3").current_dir(root()).arg(script))?;
    }
    Ok(())
}
