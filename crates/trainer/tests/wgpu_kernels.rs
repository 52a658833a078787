//! The model's CubeCL kernels against the tensor-op bodies they replace, run on wgpu: the same
//! CubeCL source as on CUDA, compiled for Mesa's software Vulkan in CI.
//!
//! The attention's block softmax (`qwen_model::attention::cube`, one kernel each way):
//! - one block at a time: probabilities, log-sum-exp, and the backward's probabilities and
//!   score gradient, over blocks with padding, packed segments, a window, a query offset and
//!   rows that see no key;
//! - the whole chunked attention under autodiff: output and the gradients of q, k and v.
//!
//! Both bodies run on the same backend in f32; the bound is 1e-5 of the largest entry (`exp`
//! and the order of the row sums differ between a kernel and tensor ops).
//!
//! The rotary embedding (`qwen_model::rowwise`, one kernel each way): output and the gradient
//! of `x` under autodiff, with `x` a `swap_dims` view as the model hands it in, and tables per
//! batch row or shared. RMSNorm (one kernel forward, one for the gradient of `x`): output and
//! the gradients of `x` and the weight under autodiff. The token embedding's gradient (one
//! kernel): the table's gradient under autodiff, ids repeating. SwiGLU's backward (one kernel):
//! both gradients under autodiff. The column sums (a bias's gradient, RMSNorm's weight
//! gradient above): under autodiff, columns vectorised or not, rows over several parts.
//!
//! Run with `cargo test -p qwen-sft --features wgpu --test wgpu_kernels`.
#![cfg(feature = "wgpu")]

use std::sync::Mutex;

use burn::backend::{Autodiff, Wgpu};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Distribution, Int, Tensor, TensorData, TensorPrimitive};
use qwen_model::attention::softmax::{backward_reference, forward_reference};
use qwen_model::attention::{
    AttentionBackend, AttentionMask, AttentionPlan, CallSegments, ScoreBlock, chunked_attention,
};
use qwen_model::{KernelBody, RowwiseBackend, set_kernel_body};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

type B = Wgpu;

const TOLERANCE: f32 = 1e-5;

/// The kernel body is set for the whole process: tests that set it take turns.
static BODY: Mutex<()> = Mutex::new(());

fn device() -> burn::backend::wgpu::WgpuDevice {
    Default::default()
}

fn values<BB: Backend, const D: usize>(t: Tensor<BB, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

fn float<BB: Backend, const D: usize>(t: burn::tensor::ops::FloatTensor<BB>) -> Tensor<BB, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

fn primitive<BB: Backend, const D: usize>(t: Tensor<BB, D>) -> burn::tensor::ops::FloatTensor<BB> {
    t.into_primitive().tensor()
}

/// Largest difference relative to the largest finite entry of `want`; infinite entries must
/// match exactly.
fn relative_diff(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want
        .iter()
        .filter(|x| x.is_finite())
        .fold(0.0f32, |m, x| m.max(x.abs()))
        .max(1e-30);
    got.iter()
        .zip(want)
        .map(|(g, w)| {
            if w.is_infinite() || g.is_infinite() {
                assert_eq!(g, w, "an infinite entry differs");
                0.0
            } else {
                assert!(g.is_finite(), "kernel gave {g}");
                (g - w).abs()
            }
        })
        .fold(0.0f32, f32::max)
        / scale
}

/// One attention call's segment ids: key rows `[batch][k_len]`; the queries are the last
/// `q_len` keys (query offset `k_len - q_len`).
struct Call {
    key_segments: Vec<Vec<i64>>,
    q_len: usize,
    window: Option<usize>,
}

impl Call {
    fn batch(&self) -> usize {
        self.key_segments.len()
    }

    fn k_len(&self) -> usize {
        self.key_segments[0].len()
    }

    fn offset(&self) -> usize {
        self.k_len() - self.q_len
    }

    fn ints(&self, values: Vec<i64>, len: usize) -> Tensor<B, 2, Int> {
        Tensor::from_data(TensorData::new(values, [self.batch(), len]), &device())
    }

    fn query_segments(&self) -> Tensor<B, 2, Int> {
        let values = self
            .key_segments
            .iter()
            .flat_map(|row| row[self.offset()..].to_vec())
            .collect();
        self.ints(values, self.q_len)
    }

    fn key_segments(&self) -> Tensor<B, 2, Int> {
        self.ints(self.key_segments.concat(), self.k_len())
    }

    fn segments(&self) -> CallSegments<B> {
        let positions = self.offset() + self.q_len;
        CallSegments {
            query_segments: self.query_segments().into_primitive(),
            key_segments: self.key_segments().into_primitive(),
            positions: Tensor::<B, 1, Int>::arange(
                0..positions.max(self.k_len()) as i64,
                &device(),
            )
            .into_primitive(),
        }
    }
}

/// Packed rows (two segments), a padded row, and a query offset of 3.
fn packed_call(window: Option<usize>) -> Call {
    Call {
        key_segments: vec![
            vec![1, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3],
            vec![4, 4, 4, 4, 4, 4, 0, 0, 0, 0, 0],
        ],
        q_len: 8,
        window,
    }
}

/// Checks one block both ways; returns whether a row of it sees no key.
fn check_block(
    call: &Call,
    [kv_heads, n_rep]: [usize; 2],
    [q_start, rows]: [usize; 2],
    [k_start, keys]: [usize; 2],
) -> bool {
    let block = ScoreBlock {
        batch: call.batch(),
        kv_heads,
        n_rep,
        q_start,
        rows,
        k_start,
        keys,
        query_offset: call.offset(),
        window: call.window,
        scale: 0.125,
    };
    let heads = kv_heads * n_rep;
    let shape = [call.batch(), kv_heads, n_rep * rows, keys];
    B::seed(&device(), (q_start * 7919 + rows * 31 + keys) as u64);
    let normal = Distribution::Normal(0.0, 8.0);
    let scores = Tensor::<B, 4>::random(shape, normal, &device());
    let grad_probs = Tensor::<B, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device());
    let stat = [call.batch(), heads, call.q_len];
    let delta = Tensor::<B, 3>::random(stat, Distribution::Normal(0.0, 1.0), &device());
    let segments = call.segments();
    let name = format!(
        "{kv_heads}x{n_rep} heads, rows {q_start}+{rows}, keys {k_start}+{keys}, window {:?}",
        call.window
    );

    // Forward: the kernel (through the backend's method) against the tensor ops.
    set_kernel_body(KernelBody::Kernel);
    assert!(B::has_softmax_kernel());
    let got = B::attention_softmax(primitive(scores.clone()), &segments, &block);
    let want = forward_reference::<B>(primitive(scores.clone()), &segments, &block);
    let probs = relative_diff(
        &values(float::<B, 4>(got.probs)),
        &values(float::<B, 4>(want.probs)),
    );
    let lse_got = values(float::<B, 3>(got.lse));
    let lse_want = values(float::<B, 3>(want.lse));
    let lse = relative_diff(&lse_got, &lse_want);
    assert!(
        probs <= TOLERANCE && lse <= TOLERANCE,
        "{name}: probs {probs}, lse {lse}"
    );

    // Backward, with and without the score gradient, against the whole call's lse (random
    // rows elsewhere, +inf where a row sees no key, as the forward left it).
    let lse_call = Tensor::<B, 3>::random(stat, Distribution::Normal(3.0, 1.0), &device());
    let lse_block =
        float::<B, 3>(forward_reference::<B>(primitive(scores.clone()), &segments, &block).lse);
    let lse_call = lse_call.slice_assign(
        [0..call.batch(), 0..heads, q_start..q_start + rows],
        lse_block,
    );
    for with_grad in [true, false] {
        let grad = || with_grad.then(|| (primitive(grad_probs.clone()), primitive(delta.clone())));
        let got = B::attention_softmax_backward(
            primitive(scores.clone()),
            primitive(lse_call.clone()),
            grad(),
            &segments,
            &block,
        );
        let want = backward_reference::<B>(
            primitive(scores.clone()),
            primitive(lse_call.clone()),
            grad(),
            &segments,
            &block,
        );
        let probs = relative_diff(
            &values(float::<B, 4>(got.probs)),
            &values(float::<B, 4>(want.probs)),
        );
        assert!(probs <= TOLERANCE, "{name}: backward probs {probs}");
        assert_eq!(got.grad_scores.is_some(), with_grad);
        if let (Some(got), Some(want)) = (got.grad_scores, want.grad_scores) {
            let grad = relative_diff(&values(float::<B, 4>(got)), &values(float::<B, 4>(want)));
            assert!(grad <= TOLERANCE, "{name}: grad scores {grad}");
        }
    }
    lse_want.iter().any(|x| x.is_infinite())
}

#[test]
fn block_softmax_kernels_match_tensor_ops() {
    let _turn = BODY.lock().unwrap_or_else(|e| e.into_inner());
    // With burn's fusion (the trainer's `wgpu` feature turns it on) the softmax methods run as
    // fusion custom operations around the kernels, as on CUDA.
    let backend = <B as Backend>::name(&device());
    assert!(
        backend.contains("fusion"),
        "not a fusion backend: {backend}"
    );
    let call = packed_call(None);
    // Every query row against every key; the padded row sees none.
    let (q_len, k_len) = (call.q_len, call.k_len());
    assert!(check_block(&call, [2, 3], [0, q_len], [0, k_len]));
    // A middle block with its causal key range, one head per kv head.
    check_block(&call, [1, 1], [2, 4], [0, call.offset() + 6]);
    // Keys from 2 on, with a window of 3.
    check_block(&packed_call(Some(3)), [2, 2], [3, 5], [2, k_len - 2]);
    // More keys than a cube has units (each strides over several): cubes of 64 units.
    let long = Call {
        key_segments: vec![[vec![1; 300], vec![2; 300], vec![0; 100]].concat()],
        q_len: 700,
        window: Some(500),
    };
    check_block(&long, [1, 2], [0, 700], [0, 700]);
    // Cubes of 32, 64 and 128 units (the kernels take about 16 keys a unit): the last rows
    // against 1,500 keys.
    let wide = Call {
        key_segments: vec![[vec![1; 900], vec![2; 600]].concat()],
        q_len: 1500,
        window: None,
    };
    check_block(&wide, [1, 2], [1490, 10], [0, 1500]);
    // More rows (batch x heads x rows = 70,400) than one axis of the grid takes.
    let tall = Call {
        key_segments: vec![vec![1; 1100]],
        q_len: 1100,
        window: None,
    };
    check_block(&tall, [8, 8], [0, 1100], [0, 8]);
    set_kernel_body(KernelBody::default());
}

/// The chunked attention (several query chunks) under autodiff with each body: output and the
/// gradients of q, k and v.
fn attention_with(body: KernelBody, call: &Call, seed: u64) -> Vec<Vec<f32>> {
    type AB = Autodiff<B>;
    set_kernel_body(body);
    assert_eq!(AB::has_softmax_kernel(), body == KernelBody::Kernel);
    let (batch, heads, kv_heads, d) = (call.batch(), 4, 2, 16);
    // Host-side seeded values: the two bodies see the same inputs.
    let mut rng = StdRng::seed_from_u64(seed);
    let mut random = |shape: [usize; 4]| {
        let n = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 4.0 - 2.0).collect();
        Tensor::<AB, 4>::from_data(TensorData::new(values, shape), &device())
    };
    let q = random([batch, heads, call.q_len, d]).require_grad();
    let k = random([batch, kv_heads, call.k_len(), d]).require_grad();
    let v = random([batch, kv_heads, call.k_len(), d]).require_grad();
    let weights = random([batch, heads, call.q_len, d]);
    let mask = AttentionMask::<AB>::new(
        Tensor::from_inner(call.query_segments()),
        Tensor::from_inner(call.key_segments()),
        call.offset(),
        call.window,
    )
    .with_chunk_memory_bytes(3 * AttentionPlan::bytes_per_query_row(batch, heads, call.k_len()));
    let out = chunked_attention(q.clone(), k.clone(), v.clone(), &mask);
    let grads = (out.clone() * weights).sum().backward();
    let grad = |x: &Tensor<AB, 4>| values(x.grad(&grads).unwrap());
    vec![values(out.inner()), grad(&q), grad(&k), grad(&v)]
}

#[test]
fn chunked_attention_is_the_same_with_the_kernels() {
    let _turn = BODY.lock().unwrap_or_else(|e| e.into_inner());
    for (call, seed) in [(packed_call(None), 1), (packed_call(Some(4)), 2)] {
        let kernel = attention_with(KernelBody::Kernel, &call, seed);
        let tensor_ops = attention_with(KernelBody::TensorOps, &call, seed);
        for (name, (got, want)) in ["output", "dq", "dk", "dv"]
            .iter()
            .zip(kernel.iter().zip(&tensor_ops))
        {
            let diff = relative_diff(got, want);
            assert!(
                diff <= TOLERANCE,
                "window {:?}, {name}: {diff}",
                call.window
            );
        }
    }
    set_kernel_body(KernelBody::default());
}

/// `apply_rotary` on `x` `[batch, heads, seq, d]` (a `swap_dims` view) under autodiff with the
/// given body, in `dtype`: the output and the gradient of `x` for a fixed upstream gradient.
fn rotary_with(
    body: KernelBody,
    [table_batch, d]: [usize; 2],
    seed: u64,
    dtype: DType,
) -> [Vec<f32>; 2] {
    type AB = Autodiff<B>;
    let _turn = BODY.lock().unwrap_or_else(|e| e.into_inner());
    set_kernel_body(body);
    assert_eq!(AB::has_rowwise_kernels(), body == KernelBody::Kernel);
    let (batch, heads, seq) = (2, 3, 5);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut random = |shape: [usize; 4]| {
        let n = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        Tensor::<AB, 4>::from_data(TensorData::new(data, shape), &device()).cast(dtype)
    };
    // [batch, seq, heads, d] -> [batch, heads, seq, d], as the model splits its heads.
    let x = random([batch, seq, heads, d]).require_grad();
    let cos = random([table_batch, 1, seq, d]);
    let sin = random([table_batch, 1, seq, d]);
    let upstream = random([batch, heads, seq, d]);
    let y = qwen_model::ops::apply_rotary(x.clone().swap_dims(1, 2), cos, sin);
    let grads = (y.clone() * upstream).sum().backward();
    let dx = x.grad(&grads).expect("x's gradient");
    // Read before the body changes back: fusion runs the queued operations only now.
    let out = [values(y.inner()), values(dx)];
    set_kernel_body(KernelBody::default());
    out
}

/// In f32 within rounding; in f16 exactly, since the kernel rounds each product to the
/// activations' dtype as the tensor ops do (Mesa has no bf16; f16 takes the same code path).
/// Head sizes 8 and 16 have their pairs read in vectors of 4, 4 in pairs, 6 one at a time.
#[test]
fn rotary_is_the_same_with_the_kernel() {
    for (table_batch, d, seed, dtype, tolerance) in [
        (2, 8, 1, DType::F32, 1e-6),
        (1, 8, 2, DType::F32, 1e-6),
        (2, 6, 4, DType::F32, 1e-6),
        (1, 4, 5, DType::F32, 1e-6),
        (2, 8, 3, DType::F16, 0.0),
        (2, 16, 6, DType::F16, 0.0),
    ] {
        let kernel = rotary_with(KernelBody::Kernel, [table_batch, d], seed, dtype);
        let tensor_ops = rotary_with(KernelBody::TensorOps, [table_batch, d], seed, dtype);
        for (what, got, want) in [
            ("output", &kernel[0], &tensor_ops[0]),
            ("dx", &kernel[1], &tensor_ops[1]),
        ] {
            let diff = relative_diff(got, want);
            assert!(
                diff <= tolerance,
                "tables of batch {table_batch}, d {d}, {dtype:?}: {what} {diff}"
            );
        }
    }
}

/// `rms_norm` on `x` `[rows, hidden]` under autodiff with the given body: the output and the
/// gradients of `x` and the weight for a fixed upstream gradient, `x` also read by a later op
/// (a residual path, whose gradient the kernel adds to the norm's).
fn rms_norm_with(body: KernelBody, hidden: usize, seed: u64) -> [Vec<f32>; 3] {
    type AB = Autodiff<B>;
    let _turn = BODY.lock().unwrap_or_else(|e| e.into_inner());
    set_kernel_body(body);
    assert_eq!(AB::has_rowwise_kernels(), body == KernelBody::Kernel);
    let rows = 12;
    let mut rng = StdRng::seed_from_u64(seed);
    // Rows of different scales, so that `rstd` differs by row.
    let x: Vec<f32> = (0..rows * hidden)
        .map(|i| rng.random_range(-1.0..1.0) * (1 + i / hidden) as f32)
        .collect();
    let weight: Vec<f32> = (0..hidden).map(|_| rng.random_range(0.5..1.5)).collect();
    let upstream: Vec<f32> = (0..rows * hidden)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let x =
        Tensor::<AB, 2>::from_data(TensorData::new(x, [rows, hidden]), &device()).require_grad();
    let weight =
        Tensor::<AB, 1>::from_data(TensorData::new(weight, [hidden]), &device()).require_grad();
    let upstream = Tensor::<AB, 2>::from_data(TensorData::new(upstream, [rows, hidden]), &device());
    let y = qwen_model::ops::rms_norm(x.clone(), weight.clone(), 1e-6);
    let residual = upstream.clone().flip([0]);
    let grads = ((y.clone() * upstream).sum() + (x.clone() * residual).sum()).backward();
    let out = [
        values(y.inner()),
        values(x.grad(&grads).expect("x's gradient")),
        values(weight.grad(&grads).expect("the weight's gradient")),
    ];
    set_kernel_body(KernelBody::default());
    out
}

/// Rows read in vectors of 4 (300: 75 vectors, one a unit; 1100: more vectors than the
/// cube's 256 units) and one element at a time (301: some units take two). The weight's
/// gradient goes through the column-sum kernel (several column cubes at 1100).
#[test]
fn rms_norm_is_the_same_with_the_kernels() {
    for (hidden, seed) in [(300, 3), (1100, 4), (301, 5)] {
        let kernel = rms_norm_with(KernelBody::Kernel, hidden, seed);
        let tensor_ops = rms_norm_with(KernelBody::TensorOps, hidden, seed);
        for (what, got, want) in [
            ("output", &kernel[0], &tensor_ops[0]),
            ("dx", &kernel[1], &tensor_ops[1]),
            ("dweight", &kernel[2], &tensor_ops[2]),
        ] {
            let diff = relative_diff(got, want);
            assert!(diff <= 1e-5, "hidden {hidden}: {what} {diff}");
        }
    }
}

/// The token embedding under autodiff with the given body: the lookup, the table's gradient
/// for a fixed upstream gradient and the tied reader's multiplier, with ids that repeat
/// (several rows add into one table row, by compare-and-swap on wgpu, which has no f32 atomic
/// addition) and table rows no id uses; the table is also read after the lookup, as a tied
/// lm_head reads it, and the lookup's rows go into that reader's gradient in place.
fn embedding_with(body: KernelBody, seed: u64) -> [Vec<f32>; 3] {
    type AB = Autodiff<B>;
    let _turn = BODY.lock().unwrap_or_else(|e| e.into_inner());
    set_kernel_body(body);
    assert_eq!(AB::has_rowwise_kernels(), body == KernelBody::Kernel);
    let (vocab, hidden, batch, seq) = (40, 24, 3, 50);
    let mut rng = StdRng::seed_from_u64(seed);
    let table: Vec<f32> = (0..vocab * hidden)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    // Ids from the first 30 rows only; id 7 at most positions.
    let ids: Vec<i64> = (0..batch * seq)
        .map(|i| {
            if i % 3 == 0 {
                rng.random_range(0..30)
            } else {
                7
            }
        })
        .collect();
    let upstream: Vec<f32> = (0..batch * seq * hidden)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let table = Tensor::<AB, 2>::from_data(TensorData::new(table, [vocab, hidden]), &device())
        .require_grad();
    let ids = Tensor::<AB, 2, Int>::from_data(TensorData::new(ids, [batch, seq]), &device());
    let upstream =
        Tensor::<AB, 3>::from_data(TensorData::new(upstream, [batch, seq, hidden]), &device());
    let y = qwen_model::ops::embedding(table.clone(), ids);
    // The table is also read after the lookup, as a tied lm_head reads it: the lookup's rows
    // are added into that gradient (in place, by the kernel).
    let tied = table.clone().flip([0]).detach();
    let grads = ((y.clone() * upstream).sum() + (table.clone() * tied.clone()).sum()).backward();
    let out = [
        values(y.inner()),
        values(table.grad(&grads).expect("the table's gradient")),
        values(tied.inner()),
    ];
    set_kernel_body(KernelBody::default());
    out
}

#[test]
fn embedding_gradient_is_the_same_with_the_kernel() {
    let kernel = embedding_with(KernelBody::Kernel, 5);
    let tensor_ops = embedding_with(KernelBody::TensorOps, 5);
    assert_eq!(kernel[0], tensor_ops[0], "the lookup");
    let diff = relative_diff(&kernel[1], &tensor_ops[1]);
    assert!(diff <= 1e-5, "the table's gradient: {diff}");
    // Rows no id uses get exactly the tied reader's gradient (its multiplier).
    assert_eq!(kernel[1][30 * 24..], kernel[2][30 * 24..]);
}

/// `swiglu` on `gate`, `up` `[rows, cols]` under autodiff with the given body: the output and
/// both gradients for a fixed upstream gradient.
fn swiglu_with(body: KernelBody, cols: usize, seed: u64) -> [Vec<f32>; 3] {
    type AB = Autodiff<B>;
    let _turn = BODY.lock().unwrap_or_else(|e| e.into_inner());
    set_kernel_body(body);
    assert_eq!(AB::has_rowwise_kernels(), body == KernelBody::Kernel);
    let rows = 7;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut random = |scale: f32| {
        let data: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random_range(-1.0..1.0) * scale)
            .collect();
        Tensor::<AB, 2>::from_data(TensorData::new(data, [rows, cols]), &device())
    };
    // Gates well into both tails of the sigmoid.
    let gate = random(6.0).require_grad();
    let up = random(1.0).require_grad();
    let upstream = random(1.0);
    let y = qwen_model::ops::swiglu(gate.clone(), up.clone());
    let grads = (y.clone() * upstream).sum().backward();
    let out = [
        values(y.inner()),
        values(gate.grad(&grads).expect("gate's gradient")),
        values(up.grad(&grads).expect("up's gradient")),
    ];
    set_kernel_body(KernelBody::default());
    out
}

/// SwiGLU's backward as one kernel: rows read in vectors of 4 (300 columns) and one element at
/// a time (301).
#[test]
fn swiglu_gradients_are_the_same_with_the_kernel() {
    for (cols, seed) in [(300, 6), (301, 7)] {
        let kernel = swiglu_with(KernelBody::Kernel, cols, seed);
        let tensor_ops = swiglu_with(KernelBody::TensorOps, cols, seed);
        assert_eq!(
            kernel[0], tensor_ops[0],
            "{cols} columns: the forward is the same ops"
        );
        for (what, got, want) in [
            ("d gate", &kernel[1], &tensor_ops[1]),
            ("d up", &kernel[2], &tensor_ops[2]),
        ] {
            let diff = relative_diff(got, want);
            assert!(diff <= 1e-5, "{cols} columns: {what} {diff}");
        }
    }
}

/// `linear` with a bias on `x` `[rows, in]` under autodiff with the given body: the bias's
/// gradient (a sum over rows) for a fixed upstream gradient.
fn bias_grad_with(body: KernelBody, [rows, out]: [usize; 2], seed: u64) -> Vec<f32> {
    type AB = Autodiff<B>;
    let _turn = BODY.lock().unwrap_or_else(|e| e.into_inner());
    set_kernel_body(body);
    let inputs = 5;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut random = |shape: [usize; 2]| {
        let data: Vec<f32> = (0..shape[0] * shape[1])
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        Tensor::<AB, 2>::from_data(TensorData::new(data, shape), &device())
    };
    let x = random([rows, inputs]);
    let weight = random([out, inputs]);
    let upstream = random([rows, out]);
    let bias = Tensor::<AB, 1>::zeros([out], &device()).require_grad();
    let y = qwen_model::ops::linear(x, weight, Some(bias.clone()));
    let grads = (y * upstream).sum().backward();
    let out = values(bias.grad(&grads).expect("the bias's gradient"));
    set_kernel_body(KernelBody::default());
    out
}

/// The bias's gradient as column sums: columns in vectors of 4 (40, and 300 over several
/// column cubes) and one at a time (33); rows over several parts with a short last one (1000)
/// and fewer rows than a cube's row units (3).
#[test]
fn bias_gradient_is_the_same_with_the_kernel() {
    for (shape, seed) in [
        ([1000, 40], 8),
        ([1000, 300], 9),
        ([1000, 33], 10),
        ([3, 40], 11),
    ] {
        let kernel = bias_grad_with(KernelBody::Kernel, shape, seed);
        let tensor_ops = bias_grad_with(KernelBody::TensorOps, shape, seed);
        let diff = relative_diff(&kernel, &tensor_ops);
        assert!(diff <= 1e-5, "{shape:?}: {diff}");
    }
}
