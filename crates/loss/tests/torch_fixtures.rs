//! Compares both loss paths with PyTorch's `F.cross_entropy(..., ignore_index=-100)`.
//!
//! Fixtures: tests/fixtures/loss/cross_entropy.{safetensors,json}, made by generate.py beside
//! them. Expected values are float64 computed from the float32 inputs.

mod common;

use common::{Ad, Cpu, Fixture, assert_close, device, fixture_dir, to_f32, to_i64};
use qwen_loss::{
    CrossEntropyOptions, Reduction, chunked_lm_head_cross_entropy, masked_cross_entropy,
    next_token_targets,
};

const REL: f64 = 1e-5;
const ABS: f64 = 1e-6;

struct Case {
    name: String,
    options: CrossEntropyOptions,
}

struct Meta {
    n: usize,
    supervised: usize,
    cases: Vec<Case>,
}

fn meta() -> Meta {
    let text = std::fs::read_to_string(fixture_dir().join("cross_entropy.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let reduction = match c["reduction"].as_str().unwrap() {
                "sum" => Reduction::Sum,
                "mean" => Reduction::Mean,
                "none" => Reduction::None,
                other => panic!("unknown reduction {other}"),
            };
            Case {
                name: c["name"].as_str().unwrap().to_owned(),
                options: CrossEntropyOptions::default()
                    .with_reduction(reduction)
                    .with_label_smoothing(c["label_smoothing"].as_f64().unwrap())
                    .with_z_loss_weight(c["z_loss_weight"].as_f64().unwrap()),
            }
        })
        .collect();
    Meta {
        n: json["shapes"]["n"].as_u64().unwrap() as usize,
        supervised: json["supervised_tokens"].as_u64().unwrap() as usize,
        cases,
    }
}

#[test]
fn plain_path_matches_torch_loss_and_logit_gradient() {
    let fx = Fixture::load("cross_entropy.safetensors");
    let meta = meta();
    let device = device();
    for case in &meta.cases {
        let logits = fx.float::<Ad, 2>("logits", &device).require_grad();
        let targets = fx.int::<Ad, 1>("targets", &device);
        let out = masked_cross_entropy(logits.clone(), targets, &case.options).unwrap();
        assert_eq!(out.n_tokens, meta.supervised, "{}", case.name);

        let expected = fx.f64s(&format!("{}.loss", case.name));
        assert_close(
            &format!("plain {} loss", case.name),
            &to_f32(out.loss.clone()),
            &expected,
            REL,
            ABS,
        );
        if case.options.reduction == Reduction::Sum {
            assert_close(
                &format!("plain {} sum", case.name),
                &to_f32(out.sum.clone()),
                &expected,
                REL,
                ABS,
            );
        }

        let grads = out.loss.sum().backward();
        let grad = logits.grad(&grads).expect("logits gradient");
        assert_close(
            &format!("plain {} grad_logits", case.name),
            &to_f32(grad),
            &fx.f64s(&format!("{}.grad_logits", case.name)),
            REL,
            ABS,
        );
    }
}

#[test]
fn fused_path_matches_torch_loss_and_both_gradients() {
    let fx = Fixture::load("cross_entropy.safetensors");
    let meta = meta();
    let device = device();
    // The default budget takes the whole problem in one tile; 2 KiB forces many tiles in both
    // directions (see ChunkPlan).
    for budget in [256 << 20, 2 << 10] {
        for case in &meta.cases {
            let opts = case.options.clone().with_chunk_memory_bytes(budget);
            let hidden = fx.float::<Ad, 2>("hidden", &device).require_grad();
            let weight = fx.float::<Ad, 2>("weight", &device).require_grad();
            let targets = fx.int::<Ad, 1>("targets", &device);
            let out = chunked_lm_head_cross_entropy(hidden.clone(), weight.clone(), targets, &opts)
                .unwrap();
            assert_eq!(out.n_tokens, meta.supervised);
            let tag = format!("fused {} (budget {budget})", case.name);
            assert_close(
                &format!("{tag} loss"),
                &to_f32(out.loss.clone()),
                &fx.f64s(&format!("{}.loss", case.name)),
                REL,
                ABS,
            );

            let grads = out.loss.sum().backward();
            assert_close(
                &format!("{tag} grad_hidden"),
                &to_f32(hidden.grad(&grads).expect("hidden gradient")),
                &fx.f64s(&format!("{}.grad_hidden", case.name)),
                REL,
                ABS,
            );
            assert_close(
                &format!("{tag} grad_weight"),
                &to_f32(weight.grad(&grads).expect("weight gradient")),
                &fx.f64s(&format!("{}.grad_weight", case.name)),
                REL,
                ABS,
            );
        }
    }
}

#[test]
fn both_paths_run_without_autodiff() {
    let fx = Fixture::load("cross_entropy.safetensors");
    let device = device();
    for case in &meta().cases {
        let expected = fx.f64s(&format!("{}.loss", case.name));
        let targets = fx.int::<Cpu, 1>("targets", &device);
        let plain = masked_cross_entropy(
            fx.float::<Cpu, 2>("logits", &device),
            targets.clone(),
            &case.options,
        )
        .unwrap();
        assert_close(
            &format!("eval plain {}", case.name),
            &to_f32(plain.loss),
            &expected,
            REL,
            ABS,
        );
        let opts = case.options.clone().with_chunk_memory_bytes(2 << 10);
        let fused = chunked_lm_head_cross_entropy(
            fx.float::<Cpu, 2>("hidden", &device),
            fx.float::<Cpu, 2>("weight", &device),
            targets,
            &opts,
        )
        .unwrap();
        assert_close(
            &format!("eval fused {}", case.name),
            &to_f32(fused.loss),
            &expected,
            REL,
            ABS,
        );
    }
}

/// `next_token_targets` gives the fixture's shifted targets, and the loss of full-length logits
/// against them equals PyTorch's `logits[:, :-1]` against `labels[:, 1:]`.
#[test]
fn shift_matches_torch_slicing() {
    let fx = Fixture::load("cross_entropy.safetensors");
    let n = meta().n;
    let device = device();
    let labels = fx.int::<Cpu, 2>("labels", &device);
    let targets = next_token_targets(labels).reshape([n]);
    assert_eq!(to_i64(targets.clone()), fx.i64s("targets"));

    let opts = CrossEntropyOptions::default().with_reduction(Reduction::Sum);
    let out = masked_cross_entropy(fx.float::<Cpu, 2>("logits", &device), targets, &opts).unwrap();
    assert_close(
        "shifted loss sum",
        &to_f32(out.sum),
        &fx.f64s("shift.loss_sum"),
        REL,
        ABS,
    );
}
