//! The chunked attention (`ops::attention`) against the reference body
//! (`ops::attention_reference`): forward output, log-sum-exp and the gradients of q, k and v,
//! on Flex and `Autodiff<Flex>`, in f32 within 1e-5 relative to the largest entry.
//!
//! Rows that see no key (padding) are compared by their own rule: the chunked op gives zeros
//! there and the reference a uniform average, so the forward check skips them, they must be
//! finite and zero, and their upstream gradient is zero, as it is in the model (no loss reads a
//! padding row and no other row attends to it).

mod common;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, FloatDType, Int, Tensor, TensorData, TensorPrimitive};
use common::{AB, B, device, max_abs_diff};
use qwen_model::attention::{AttentionBackend, AttentionInputs, AttentionMask, AttentionPlan};
use qwen_model::ops;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const TOLERANCE: f32 = 1e-5;

/// One attention problem: shapes, segment ids of the keys (the queries are the last `q_len`
/// keys, as in the model), the window and the query rows per chunk.
#[derive(Debug, Clone)]
struct Case {
    name: &'static str,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    q_len: usize,
    /// `[batch][k_len]`
    key_segments: Vec<Vec<i64>>,
    window: Option<usize>,
    chunk_rows: usize,
}

impl Case {
    fn batch(&self) -> usize {
        self.key_segments.len()
    }

    fn k_len(&self) -> usize {
        self.key_segments[0].len()
    }

    fn offset(&self) -> usize {
        self.k_len() - self.q_len
    }

    fn query_segments(&self) -> Vec<i64> {
        self.key_segments
            .iter()
            .flat_map(|row| row[self.offset()..].to_vec())
            .collect()
    }

    fn mask<BB: Backend<Device = burn::backend::flex::FlexDevice>>(&self) -> AttentionMask<BB> {
        let (batch, q_len, k_len) = (self.batch(), self.q_len, self.k_len());
        let ints = |values: Vec<i64>, len: usize| {
            Tensor::<BB, 2, Int>::from_data(TensorData::new(values, [batch, len]), &device())
        };
        let keys: Vec<i64> = self.key_segments.concat();
        let budget = self.chunk_rows * AttentionPlan::bytes_per_query_row(batch, self.heads, k_len);
        AttentionMask::new(
            ints(self.query_segments(), q_len),
            ints(keys, k_len),
            self.offset(),
            self.window,
        )
        .with_chunk_memory_bytes(budget)
    }

    /// Per query row (`[batch][q_len]` flattened): does it see at least one key?
    fn sees_a_key(&self) -> Vec<bool> {
        let forbidden = self
            .mask::<B>()
            .forbidden()
            .into_data()
            .to_vec::<bool>()
            .unwrap();
        forbidden
            .chunks(self.k_len())
            .map(|row| row.iter().any(|&f| !f))
            .collect()
    }

    fn q_shape(&self) -> [usize; 4] {
        [self.batch(), self.heads, self.q_len, self.head_dim]
    }

    fn kv_shape(&self) -> [usize; 4] {
        [self.batch(), self.kv_heads, self.k_len(), self.head_dim]
    }
}

/// Uniform in `[-scale, scale)`, from a seed.
fn random(rng: &mut SmallRng, shape: [usize; 4], scale: f32) -> TensorData {
    let n = shape.iter().product();
    let values: Vec<f32> = (0..n)
        .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
        .collect();
    TensorData::new(values, shape)
}

fn values<BB: Backend, const D: usize>(t: Tensor<BB, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

/// Largest difference relative to the largest entry of `want`.
fn relative_diff(got: &[f32], want: &[f32]) -> f32 {
    let scale = want.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1e-30);
    max_abs_diff(got, want) / scale
}

/// `[batch, heads, q_len, d]` values with the rows that see no key dropped.
fn seen_rows(case: &Case, data: &[f32]) -> Vec<f32> {
    let sees = case.sees_a_key();
    let (heads, q_len, d) = (case.heads, case.q_len, case.head_dim);
    data.chunks(d)
        .enumerate()
        .filter(|(i, _)| {
            let (b, row) = (i / (heads * q_len), i % q_len);
            sees[b * q_len + row]
        })
        .flat_map(|(_, r)| r.to_vec())
        .collect()
}

/// Checks the forward output on the rows that see a key, zeros elsewhere, and the
/// log-sum-exp; returns the output's relative difference.
fn check_forward(case: &Case, seed: u64) -> f32 {
    let mut rng = SmallRng::seed_from_u64(seed);
    let q = Tensor::<B, 4>::from_data(random(&mut rng, case.q_shape(), 2.0), &device());
    let k = Tensor::<B, 4>::from_data(random(&mut rng, case.kv_shape(), 2.0), &device());
    let v = Tensor::<B, 4>::from_data(random(&mut rng, case.kv_shape(), 1.0), &device());
    let mask = case.mask::<B>();

    let got = values(ops::attention(q.clone(), k.clone(), v.clone(), &mask));
    let want = values(ops::attention_reference(
        q.clone(),
        k.clone(),
        v.clone(),
        &mask,
    ));
    assert!(
        got.iter().all(|x| x.is_finite()),
        "{}: non-finite output",
        case.name
    );
    let diff = relative_diff(&seen_rows(case, &got), &seen_rows(case, &want));
    assert!(
        diff < TOLERANCE,
        "{}: output differs by {diff:e} relative",
        case.name
    );
    let sees = case.sees_a_key();
    let d = case.head_dim;
    for (i, row) in got.chunks(d).enumerate() {
        let (b, r) = (i / (case.heads * case.q_len), i % case.q_len);
        if !sees[b * case.q_len + r] {
            assert!(
                row.iter().all(|&x| x == 0.0),
                "{}: padding row {i}",
                case.name
            );
        }
    }

    // The log-sum-exp of the masked, scaled scores, from the whole `[b, heads, q, k]` scores.
    let forward = B::causal_attention_forward(
        AttentionInputs {
            q: q.clone().into_primitive().tensor(),
            k: k.clone().into_primitive().tensor(),
            v: v.into_primitive().tensor(),
            query_segments: mask.query_segments.clone().into_primitive(),
            key_segments: mask.key_segments.clone().into_primitive(),
        },
        &mask.params(),
    );
    let lse = values(Tensor::<B, 3>::from_primitive(TensorPrimitive::Float(
        forward.lse,
    )));
    let n_rep = case.heads / case.kv_heads;
    let [batch, heads, q_len, _] = case.q_shape();
    let k_len = case.k_len();
    // [batch, kv_heads, k_len, d] -> [batch, heads, k_len, d]
    let k = k
        .unsqueeze_dim::<5>(2)
        .expand([batch, case.kv_heads, n_rep, k_len, d])
        .reshape([batch, heads, k_len, d]);
    let scores = q
        .matmul(k.swap_dims(2, 3))
        .mul_scalar((d as f64).powf(-0.5))
        .mask_fill(
            mask.forbidden().expand([batch, heads, q_len, k_len]),
            f32::NEG_INFINITY,
        ); // [batch, heads, q_len, k_len]
    let max = scores.clone().max_dim(3);
    let want_lse = values((scores - max.clone()).exp().sum_dim(3).log() + max);
    let mut worst = 0.0f32;
    for (i, (&got, &want)) in lse.iter().zip(&want_lse).enumerate() {
        let (b, r) = (i / (heads * q_len), i % q_len);
        if sees[b * q_len + r] {
            worst = worst.max((got - want).abs() / want.abs().max(1.0));
        } else {
            assert_eq!(got, f32::INFINITY, "{}: lse of padding row {i}", case.name);
        }
    }
    assert!(worst < TOLERANCE, "{}: lse differs by {worst:e}", case.name);
    diff
}

/// The gradients of `sum(g * attention(q, k, v))` for a random `g` that is zero on rows that
/// see no key; returns the relative differences of dq, dk, dv.
fn check_backward(case: &Case, seed: u64) -> [f32; 3] {
    let mut rng = SmallRng::seed_from_u64(seed);
    let q_data = random(&mut rng, case.q_shape(), 2.0);
    let k_data = random(&mut rng, case.kv_shape(), 2.0);
    let v_data = random(&mut rng, case.kv_shape(), 1.0);
    let mut g = values(Tensor::<B, 4>::from_data(
        random(&mut rng, case.q_shape(), 1.0),
        &device(),
    ));
    let sees = case.sees_a_key();
    for (i, row) in g.chunks_mut(case.head_dim).enumerate() {
        let (b, r) = (i / (case.heads * case.q_len), i % case.q_len);
        if !sees[b * case.q_len + r] {
            row.fill(0.0);
        }
    }
    let g = TensorData::new(g, case.q_shape());
    let mask = case.mask::<AB>();

    type Attn =
        fn(Tensor<AB, 4>, Tensor<AB, 4>, Tensor<AB, 4>, &AttentionMask<AB>) -> Tensor<AB, 4>;
    let grads = |attention: Attn| {
        let q = Tensor::<AB, 4>::from_data(q_data.clone(), &device()).require_grad();
        let k = Tensor::<AB, 4>::from_data(k_data.clone(), &device()).require_grad();
        let v = Tensor::<AB, 4>::from_data(v_data.clone(), &device()).require_grad();
        let g = Tensor::<AB, 4>::from_data(g.clone(), &device());
        let out = attention(q.clone(), k.clone(), v.clone(), &mask);
        let grads = (out * g).sum().backward();
        [q, k, v].map(|t| values(t.grad(&grads).expect("a gradient")))
    };
    let got = grads(ops::attention::<AB>);
    let want = grads(ops::attention_reference::<AB>);
    let mut diffs = [0.0; 3];
    for (i, name) in ["dq", "dk", "dv"].iter().enumerate() {
        assert!(
            got[i].iter().all(|x| x.is_finite()),
            "{}: non-finite {name}",
            case.name
        );
        diffs[i] = relative_diff(&got[i], &want[i]);
        assert!(
            diffs[i] < TOLERANCE,
            "{}: {name} differs by {:e} relative",
            case.name,
            diffs[i]
        );
    }
    diffs
}

fn check(case: &Case) {
    let forward = check_forward(case, 7);
    let [dq, dk, dv] = check_backward(case, 11);
    println!(
        "{}: max relative diff: output {forward:e}, dq {dq:e}, dk {dk:e}, dv {dv:e}",
        case.name
    );
}

/// Row 0 is one full sequence; row 1 a shorter one followed by padding.
fn padded(len: usize, real: usize) -> Vec<Vec<i64>> {
    vec![
        vec![1; len],
        (0..len).map(|i| i64::from(i < real)).collect(),
    ]
}

#[test]
fn gqa_ratio_1_padded_rows() {
    for chunk_rows in [1, 4, 9] {
        check(&Case {
            name: "ratio 1, padded",
            heads: 2,
            kv_heads: 2,
            head_dim: 8,
            q_len: 9,
            key_segments: padded(9, 5),
            window: None,
            chunk_rows,
        });
    }
}

#[test]
fn gqa_ratio_7_packed_rows() {
    for chunk_rows in [1, 3, 5, 11] {
        check(&Case {
            name: "ratio 7, packed",
            heads: 14,
            kv_heads: 2,
            head_dim: 16,
            q_len: 11,
            key_segments: vec![
                vec![1, 1, 1, 2, 2, 2, 2, 3, 3, 0, 0],
                vec![1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2],
            ],
            window: None,
            chunk_rows,
        });
    }
}

#[test]
fn gqa_ratio_7_sliding_window() {
    for chunk_rows in [1, 4, 5, 13] {
        check(&Case {
            name: "ratio 7, sliding window 4",
            heads: 7,
            kv_heads: 1,
            head_dim: 8,
            q_len: 13,
            key_segments: vec![vec![1; 13], vec![1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 0]],
            window: Some(4),
            chunk_rows,
        });
    }
}

#[test]
fn query_offset_prefill_and_decode() {
    // Row 1 is left-padded, as generation pads a batch of prompts.
    let keys = vec![
        vec![1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
        vec![0, 0, 0, 1, 1, 1, 1, 1, 1, 1],
    ];
    for (q_len, chunk_rows, window) in [
        (3, 2, None),
        (3, 1, Some(3)),
        (1, 1, None),
        (1, 1, Some(2)),
        (6, 4, None),
    ] {
        check(&Case {
            name: "query offset",
            heads: 7,
            kv_heads: 1,
            head_dim: 8,
            q_len,
            key_segments: keys.clone(),
            window,
            chunk_rows,
        });
    }
}

#[test]
fn all_padding_row_is_finite_and_zero() {
    let case = Case {
        name: "all padding",
        heads: 4,
        kv_heads: 2,
        head_dim: 8,
        q_len: 6,
        key_segments: vec![vec![0; 6], vec![1, 1, 1, 0, 0, 0]],
        window: None,
        chunk_rows: 4,
    };
    // Also with every row of the batch padding: the op must not divide by zero anywhere.
    check(&case);
    let mut rng = SmallRng::seed_from_u64(3);
    let all = Case {
        key_segments: vec![vec![0; 6]; 2],
        ..case
    };
    let q =
        Tensor::<AB, 4>::from_data(random(&mut rng, all.q_shape(), 2.0), &device()).require_grad();
    let k =
        Tensor::<AB, 4>::from_data(random(&mut rng, all.kv_shape(), 2.0), &device()).require_grad();
    let v =
        Tensor::<AB, 4>::from_data(random(&mut rng, all.kv_shape(), 1.0), &device()).require_grad();
    let out = ops::attention(q.clone(), k.clone(), v.clone(), &all.mask::<AB>());
    let grads = out.clone().sum().backward();
    assert!(values(out).iter().all(|&x| x == 0.0));
    for t in [q, k, v] {
        assert!(values(t.grad(&grads).unwrap()).iter().all(|&x| x == 0.0));
    }
}

#[test]
fn bf16_matches_the_reference_to_bf16_precision() {
    let case = Case {
        name: "bf16",
        heads: 14,
        kv_heads: 2,
        head_dim: 16,
        q_len: 11,
        key_segments: padded(11, 8),
        window: None,
        chunk_rows: 3,
    };
    let mask = case.mask::<B>();
    let mut rng = SmallRng::seed_from_u64(5);
    let mut tensor = |shape: [usize; 4]| {
        Tensor::<B, 4>::from_data(random(&mut rng, shape, 2.0), &device()).cast(FloatDType::BF16)
    };
    let (q, k, v) = (
        tensor(case.q_shape()),
        tensor(case.kv_shape()),
        tensor(case.kv_shape()),
    );
    let got = ops::attention(q.clone(), k.clone(), v.clone(), &mask);
    assert_eq!(got.dtype(), DType::BF16);
    let want = ops::attention_reference(q, k, v, &mask);
    let diff = relative_diff(
        &seen_rows(&case, &values(got)),
        &seen_rows(&case, &values(want)),
    );
    println!("bf16: max relative diff {diff:e}");
    assert!(diff < 2e-2, "bf16 output differs by {diff:e}");
}

#[test]
fn plan_takes_whole_rows_within_the_budget() {
    let per_row = AttentionPlan::bytes_per_query_row(8, 14, 2048);
    assert_eq!(per_row, 8 * 14 * 2048 * 4 * 4);
    assert_eq!(
        AttentionPlan::new(8, 14, 2048, 2048, 10 * per_row).query_rows,
        10
    );
    assert_eq!(
        AttentionPlan::new(8, 14, 2048, 2048, 10 * per_row + 1).query_rows,
        10
    );
    // A budget below one row still runs, one row at a time; a big one takes every row.
    assert_eq!(AttentionPlan::new(8, 14, 2048, 2048, 1).query_rows, 1);
    assert_eq!(
        AttentionPlan::new(8, 14, 2048, 2048, usize::MAX).query_rows,
        2048
    );
}
