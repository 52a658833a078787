//! The chunked loss's CubeCL kernels (`qwen_loss::chunked::cube`) against the tensor-op bodies
//! they replace, run on wgpu: the same CubeCL source as on CUDA, compiled for Mesa's software
//! Vulkan in CI.
//!
//! - A tile's row statistics (log-sum-exp, target logit, mean logit) and a tile's logit
//!   gradient (with label smoothing, targets inside and outside the tile, a tile that starts
//!   past column 0), through the backend's methods with the kernels on and off.
//! - The whole chunked lm_head + loss under autodiff, several row chunks and vocabulary slabs,
//!   label smoothing and z-loss: the loss and both gradients with the kernels against without.
//!
//! Both bodies run on the same backend, in f32 (WGSL has no bf16: the CUDA runs in bf16 are
//! checked on the GPU, `check-fast-path` and the loss curve); they agree within 1e-5 of the
//! largest entry (`exp` and the order of the sums differ).
//!
//! Run with `cargo test -p qwen-sft --features wgpu --test wgpu_loss_kernels`.
#![cfg(feature = "wgpu")]

use std::sync::Mutex;

use burn::backend::{Autodiff, Wgpu};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Distribution, Int, Tensor, TensorData, TensorPrimitive};
use qwen_loss::{
    ChunkedCeBackend, CrossEntropyOptions, GradTile, LossKernels, Reduction,
    chunked_lm_head_cross_entropy, set_loss_kernels,
};

type B = Wgpu;

/// The loss-kernel setting is process-wide: tests that set it take turns.
static SETTING: Mutex<()> = Mutex::new(());

fn device() -> burn::backend::wgpu::WgpuDevice {
    Default::default()
}

fn values<BB: Backend, const D: usize>(t: Tensor<BB, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

fn float<const D: usize>(t: burn::tensor::ops::FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

fn primitive<const D: usize>(t: Tensor<B, D>) -> burn::tensor::ops::FloatTensor<B> {
    t.into_primitive().tensor()
}

/// Largest difference relative to the largest entry of `want`.
fn relative_diff(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1e-30);
    got.iter()
        .zip(want)
        .map(|(g, w)| {
            assert!(g.is_finite(), "kernel gave {g}");
            (g - w).abs()
        })
        .fold(0.0f32, f32::max)
        / scale
}

fn targets(ids: &[i64]) -> Tensor<B, 1, Int> {
    Tensor::from_data(TensorData::new(ids.to_vec(), [ids.len()]), &device())
}

/// Runs `f` with the kernels on (`true`) or off, then restores the default.
fn with_kernels<T>(on: bool, f: impl FnOnce() -> T) -> T {
    set_loss_kernels(if on {
        LossKernels::Kernel
    } else {
        LossKernels::TensorOps
    });
    assert_eq!(B::loss_kernels_run(), on);
    let out = f();
    set_loss_kernels(LossKernels::default());
    out
}

#[test]
fn row_stats_kernel_equals_tensor_ops() {
    let _turn = SETTING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    // Rows longer than a cube's 256 units many times over (several groups per unit, then a
    // tail), read in vectors of 4 (9000, 100) and one element at a time (odd lengths), and
    // one shorter than a cube.
    for (rows, vocab) in [(4, 9000), (4, 9001), (5, 3001), (3, 100)] {
        let logits =
            Tensor::<B, 2>::random([rows, vocab], Distribution::Normal(0.0, 4.0), &device());
        let ids: Vec<i64> = (0..rows).map(|r| ((r * 977 + 13) % vocab) as i64).collect();
        let run = |on: bool| {
            with_kernels(on, || {
                let stats = B::logit_row_stats(
                    primitive(logits.clone()),
                    targets(&ids).into_primitive(),
                    true,
                );
                values(float::<2>(stats))
            })
        };
        let (got, want) = (run(true), run(false));
        // Each statistic on its own scale, at least 1 (the mean logit is near 0).
        for (column, name) in ["lse", "target logit", "mean logit"].iter().enumerate() {
            let pick = |v: &[f32]| {
                v.iter()
                    .skip(column)
                    .step_by(3)
                    .copied()
                    .collect::<Vec<_>>()
            };
            let (got, want) = (pick(&got), pick(&want));
            let scale = want.iter().fold(1.0f32, |m, x| m.max(x.abs()));
            let diff = got
                .iter()
                .zip(&want)
                .map(|(g, w)| (g - w).abs())
                .fold(0.0f32, f32::max);
            assert!(
                diff <= 1e-5 * scale,
                "[{rows}, {vocab}], {name}: {diff} at scale {scale}"
            );
        }
    }
}

#[test]
fn logits_grad_kernel_equals_tensor_ops() {
    let _turn = SETTING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let (rows, vocab) = (6, 5000);
    // 700 columns are read in vectors of 4 (targets in several lanes), 701 one at a time, and
    // a transposed view (columns not contiguous) through a copy.
    for (cols, col_start, eps, transposed) in [
        (700, 0, 0.0, false),
        (700, 1200, 0.1, false),
        (701, 1200, 0.1, false),
        (700, 1200, 0.1, true),
    ] {
        let logits = if transposed {
            Tensor::<B, 2>::random([cols, rows], Distribution::Normal(0.0, 3.0), &device())
                .transpose()
        } else {
            Tensor::<B, 2>::random([rows, cols], Distribution::Normal(0.0, 3.0), &device())
        };
        let lse = Tensor::<B, 1>::random([rows], Distribution::Normal(8.0, 1.0), &device());
        let g = Tensor::<B, 1>::random([rows], Distribution::Uniform(0.1, 1.0), &device());
        let p_scale = g.clone() * 1.3;
        // Targets in the tile (its first and last column among them) and outside it.
        let ids: Vec<i64> = [0, cols - 1, 17, cols + 3, 4999, 350]
            .iter()
            .map(|&c| (col_start + c) as i64 % vocab as i64)
            .collect();
        let tile = GradTile {
            col_start,
            vocab,
            label_smoothing: eps,
        };
        let run = |on: bool| {
            with_kernels(on, || {
                let d = B::logits_grad(
                    primitive(logits.clone()),
                    primitive(lse.clone()),
                    primitive(p_scale.clone()),
                    primitive(g.clone()),
                    targets(&ids).into_primitive(),
                    tile,
                );
                let d = float::<2>(d);
                assert_eq!(d.dtype(), DType::F32);
                values(d)
            })
        };
        let diff = relative_diff(&run(true), &run(false));
        assert!(
            diff <= 1e-5,
            "{cols} columns at {col_start}, eps {eps}, transposed {transposed}: {diff}"
        );
    }
}

#[test]
fn chunked_loss_with_kernels_equals_tensor_ops_under_autodiff() {
    let _turn = SETTING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    type A = Autodiff<B>;
    let (n, dim, vocab) = (24, 32, 1500);
    let hidden = Tensor::<A, 2>::random([n, dim], Distribution::Normal(0.0, 1.0), &device());
    let weight = Tensor::<A, 2>::random([vocab, dim], Distribution::Normal(0.0, 0.3), &device());
    // Every third row ignored.
    let ids: Vec<i64> = (0..n)
        .map(|i| {
            if i % 3 == 2 {
                -100
            } else {
                ((i * 389) % vocab) as i64
            }
        })
        .collect();
    let opts = CrossEntropyOptions {
        reduction: Reduction::Mean,
        label_smoothing: 0.1,
        z_loss_weight: 1e-3,
        // Small tiles: several row chunks and vocabulary slabs.
        chunk_memory_bytes: 64 * 1024,
    };
    let run = |on: bool| {
        with_kernels(on, || {
            let h = hidden.clone().detach().require_grad();
            let w = weight.clone().detach().require_grad();
            let t = Tensor::<A, 1, Int>::from_data(TensorData::new(ids.clone(), [n]), &device());
            let out = chunked_lm_head_cross_entropy(h.clone(), w.clone(), t, &opts).unwrap();
            let grads = out.loss.clone().backward();
            [
                values(out.loss.inner()),
                values(h.grad(&grads).unwrap()),
                values(w.grad(&grads).unwrap()),
            ]
        })
    };
    let (got, want) = (run(true), run(false));
    for (name, got, want) in [
        ("loss", &got[0], &want[0]),
        ("hidden grad", &got[1], &want[1]),
        ("weight grad", &got[2], &want[2]),
    ] {
        let diff = relative_diff(got, want);
        assert!(diff <= 1e-5, "{name}: {diff}");
    }
}
