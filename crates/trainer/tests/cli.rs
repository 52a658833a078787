//! The `qwen-sft` binary: subcommands end to end, and errors that say what is wrong and where.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn qwen_sft(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qwen-sft"))
        .args(args)
        .output()
        .expect("qwen-sft runs")
}

fn ok(output: &Output) -> String {
    assert!(
        output.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn err(output: &Output) -> String {
    assert!(
        !output.status.success(),
        "should have failed; stdout: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    String::from_utf8_lossy(&output.stderr).to_string()
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn init_generate_and_chat() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    ok(&qwen_sft(&[
        "init",
        "--preset",
        "tiny",
        "--output",
        s(&model),
        "--seed",
        "3",
    ]));
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(model.join(file).exists(), "{file}");
    }
    let text = ok(&qwen_sft(&[
        "generate",
        "--model",
        s(&model),
        "--prompt",
        "hi",
        "--greedy",
        "--max-new-tokens",
        "4",
    ]));
    assert!(!text.is_empty());
    // Sampling with the defaults from generation_config.json, seeded: the same twice.
    let sampled = [
        "generate",
        "--model",
        s(&model),
        "--prompt",
        "hi",
        "--max-new-tokens",
        "4",
        "--seed",
        "9",
    ];
    assert_eq!(ok(&qwen_sft(&sampled)), ok(&qwen_sft(&sampled)));

    let mut child = Command::new(env!("CARGO_BIN_EXE_qwen-sft"))
        .args([
            "chat",
            "--model",
            s(&model),
            "--greedy",
            "--max-new-tokens",
            "3",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all("2+2等于几\nand then?\n\n".as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Two questions answered, then the empty line ends the session at the third prompt.
    let prompts = String::from_utf8(out.stderr).unwrap().matches("> ").count();
    assert_eq!(prompts, 3);
    assert!(!out.stdout.is_empty());
}

#[test]
fn score_prints_one_json_line_per_example() {
    // The fixture model with the bundled tokenizer beside it.
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(
            fixtures().join("model/tied_f32").join(file),
            model.join(file),
        )
        .unwrap();
    }
    std::fs::write(
        model.join("tokenizer.json"),
        qwen_chat::bundled::TOKENIZER_JSON,
    )
    .unwrap();
    std::fs::write(
        model.join("tokenizer_config.json"),
        qwen_chat::bundled::TOKENIZER_CONFIG_JSON,
    )
    .unwrap();
    let out = ok(&qwen_sft(&[
        "score",
        "--model",
        s(&model),
        "--data",
        s(&fixtures().join("score/chats.jsonl")),
    ]));
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 6);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["index"], i);
        assert!(line["loss_sum"].as_f64().unwrap() > 0.0);
        assert!(line["n_tokens"].as_u64().unwrap() > 0);
        assert_eq!(line.as_object().unwrap().len(), 3, "{line}");
    }
    let eval = ok(&qwen_sft(&[
        "eval",
        "--model",
        s(&model),
        "--data",
        s(&fixtures().join("score/chats.jsonl")),
    ]));
    let eval: serde_json::Value = serde_json::from_str(eval.trim()).unwrap();
    let total: f64 = lines.iter().map(|l| l["loss_sum"].as_f64().unwrap()).sum();
    let tokens: u64 = lines.iter().map(|l| l["n_tokens"].as_u64().unwrap()).sum();
    assert!((eval["loss"].as_f64().unwrap() - total / tokens as f64).abs() < 1e-9);
    assert!((eval["perplexity"].as_f64().unwrap() - (total / tokens as f64).exp()).abs() < 1e-6);
}

#[test]
fn inspect_marks_supervised_spans() {
    let out = ok(&qwen_sft(&[
        "inspect",
        "--data",
        s(&fixtures().join("score/chats.jsonl")),
        "--show",
        "1",
    ]));
    assert!(out.contains("⟦"), "{out}");
    assert!(out.contains("supervised tokens"), "{out}");
}

/// `check-fast-path` on the fixture model in `precision` (and `extra` arguments): the output and
/// the JSON report.
fn check_fast_path(precision: &str, extra: &[&str]) -> (Output, serde_json::Value) {
    let model = fixtures().join("model/tied_f32");
    let args = [
        &[
            "check-fast-path",
            "--model",
            s(&model),
            "--precision",
            precision,
        ],
        extra,
    ]
    .concat();
    let output = qwen_sft(&args);
    let line = String::from_utf8_lossy(&output.stdout).trim().to_string();
    let report = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    (output, report)
}

#[test]
fn check_fast_path_agrees_on_the_fixture() {
    let (output, report) = check_fast_path("f32", &[]);
    ok(&output);
    assert_eq!(report["pass"], true, "{report}");
    assert_eq!(report["gemm"], "burn", "{report}");
    assert_eq!(report["precision"], "f32");
    assert_eq!(report["tolerance"], 1e-4);
    assert_eq!(report["rows"], 2);
    assert!(report["tokens"].as_u64().unwrap() > 0, "{report}");
    for key in ["logits_rel", "loss_rel", "grad_rel_max"] {
        let rel = report[key]
            .as_f64()
            .unwrap_or_else(|| panic!("no {key}: {report}"));
        assert!((0.0..1e-4).contains(&rel), "{key}: {report}");
    }
    // The two attention bodies round differently, so some gradient differs a little; exactly 0
    // would mean nothing was compared.
    assert!(report["grad_rel_max"].as_f64().unwrap() > 0.0, "{report}");
    assert!(
        report["grad_rel_worst_param"]
            .as_str()
            .unwrap()
            .starts_with("model.")
    );

    // Past the tolerance: the same line, then a failure.
    let (output, report) = check_fast_path("f32", &["--tolerance", "0"]);
    let e = err(&output);
    assert!(e.contains("tolerance") || e.contains("differs"), "{e}");
    assert_eq!(report["pass"], false, "{report}");
}

#[test]
fn an_unknown_kernel_to_turn_off_is_refused() {
    let model = fixtures().join("model/tied_f32");
    let args = [
        "--kernels-off",
        "rotary,rmsnorm",
        "check-fast-path",
        "--model",
        s(&model),
    ];
    let e = err(&qwen_sft(&args));
    assert!(e.contains("rmsnorm") && e.contains("rms-norm"), "{e}");
}

/// In bf16 the check also measures both paths against the reference path in f32, and passes on
/// either criterion.
#[test]
fn check_fast_path_in_bf16_measures_both_paths_against_f32() {
    let (output, report) = check_fast_path("bf16", &[]);
    ok(&output);
    assert_eq!(report["pass"], true, "{report}");
    let against = &report["against_f32"];
    for path in ["fast", "reference"] {
        let rel = against[path]["grad_rel_max"].as_f64().unwrap();
        // bf16 against f32: rounding shows, but nothing like a wrong gradient.
        assert!(rel > 1e-4 && rel < 0.2, "{path}: {report}");
    }
    let params = against["per_parameter"].as_array().unwrap();
    assert!(params.len() > 10, "{report}");
    assert!(
        params[0][0].as_str().unwrap().starts_with("model."),
        "{report}"
    );
    let within = ["logits_rel", "loss_rel", "grad_rel_max"]
        .iter()
        .all(|key| report[key].as_f64().unwrap() <= report["tolerance"].as_f64().unwrap());
    let no_farther = against["fast_no_farther"].as_bool().unwrap();
    assert!(within || no_farther, "{report}");
}

#[test]
fn bench_linear_times_every_gemm_of_a_step() {
    let out = ok(&qwen_sft(&[
        "bench-linear",
        "--preset",
        "tiny",
        "--rows",
        "48",
        "--iterations",
        "1",
        "--precision",
        "f32",
    ]));
    let reports: Vec<serde_json::Value> = out
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    // Six layer shapes, each forward, grad input and grad weight.
    assert_eq!(reports.len(), 18, "{out}");
    let grad_weight = &reports[2];
    assert_eq!(grad_weight["name"], "self_attn.q_proj grad weight");
    assert_eq!(grad_weight["transpose_a"], true);
    assert_eq!(
        grad_weight["k"], 48,
        "the token axis is summed over: {grad_weight}"
    );
    // The CPU has only burn's body, whatever `--gemm` asks for: both timings run the same code.
    let host_sync = ok(&qwen_sft(&[
        "bench-linear",
        "--gemm",
        "cublaslt",
        "--preset",
        "tiny",
        "--rows",
        "8",
        "--iterations",
        "1",
    ]));
    assert_eq!(host_sync.lines().count(), 18, "{host_sync}");
    assert!(host_sync.contains("\"body\":\"burn\""), "{host_sync}");
    for report in &reports {
        assert_eq!(report["body"], "burn", "{report}");
        assert_eq!(report["max_relative_diff"], 0.0, "{report}");
        assert!(report["tflops"].as_f64().unwrap() > 0.0, "{report}");
    }
}

#[test]
fn bad_inputs_say_what_and_where() {
    let dir = tempfile::tempdir().unwrap();

    let config = dir.path().join("run.toml");
    std::fs::write(&config, "[optim]\nlearning_rate = 1e-4\n").unwrap();
    let e = err(&qwen_sft(&["train", "--config", s(&config), "--quiet"]));
    assert!(e.contains("run.toml") && e.contains("learning_rate"), "{e}");

    let e = err(&qwen_sft(&["bench-linear", "--gemm", "cublas"]));
    assert!(e.contains("cublas") && e.contains("burn, cublaslt"), "{e}");

    let e = err(&qwen_sft(&["train", "--preset", "huge", "--quiet"]));
    assert!(e.contains("huge") && e.contains("0.5b"), "{e}");

    let e = err(&qwen_sft(&[
        "train",
        "--preset",
        "tiny",
        "--set",
        "train.batch_size=0",
        "--quiet",
    ]));
    assert!(e.contains("train.batch_size"), "{e}");

    let data = dir.path().join("bad.jsonl");
    std::fs::write(&data, "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"yo\"}]}\n{not json\n").unwrap();
    let out = dir.path().join("run");
    let e = err(&qwen_sft(&[
        "train",
        "--preset",
        "tiny",
        "--data",
        s(&data),
        "--output",
        s(&out),
        "--max-steps",
        "1",
        "--quiet",
    ]));
    assert!(e.contains("bad.jsonl:2"), "{e}");

    let missing = dir.path().join("no-such-model");
    let e = err(&qwen_sft(&[
        "generate",
        "--model",
        s(&missing),
        "--prompt",
        "hi",
    ]));
    assert!(e.contains("no-such-model"), "{e}");
}
