//! The reference bodies of the chunked attention, written with plain tensor ops.
//!
//! They run on whatever backend they are given; a backend with a fused kernel overrides
//! [`AttentionBackend`]'s methods instead of changing these.

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, FloatDType, Tensor, TensorMetadata, TensorPrimitive};
use qwen_gemm::GemmBackend;

use super::softmax::{CallSegments, ScoreBlock};
use super::{
    AttentionBackend, AttentionForward, AttentionGradRequest, AttentionGrads, AttentionInputs,
    AttentionParams, AttentionPlan, positions,
};

pub(super) fn float<B: Backend, const D: usize>(primitive: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(primitive))
}

pub(super) fn primitive<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> FloatTensor<B> {
    tensor.into_primitive().tensor()
}

/// `op(a) @ op(b)` per batch entry on the backend's [`GemmBackend::gemm`] body (cuBLASLt on
/// CUDA, which reads a transposed operand in place).
fn gemm<B: GemmBackend>(a: Tensor<B, 4>, b: Tensor<B, 4>, ta: bool, tb: bool) -> Tensor<B, 4> {
    float(B::gemm(primitive(a), primitive(b), ta, tb))
}

/// Start and length of each chunk of `step` over `0..len`.
fn chunks(len: usize, step: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..len)
        .step_by(step.max(1))
        .map(move |start| (start, step.min(len - start)))
}

/// The inputs as tensors, with their sizes checked once.
struct Problem<B: GemmBackend> {
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    segments: CallSegments<B>,
    batch: usize,
    heads: usize,
    kv_heads: usize,
    q_len: usize,
    k_len: usize,
    head_dim: usize,
    dtype: DType,
    scale: f32,
    params: AttentionParams,
}

/// One query chunk and the keys it can see.
#[derive(Debug, Clone, Copy)]
struct Block {
    q_start: usize,
    rows: usize,
    k_start: usize,
    keys: usize,
}

impl<B: GemmBackend> Problem<B> {
    fn new(inputs: AttentionInputs<B>, params: &AttentionParams) -> Self {
        let q = float::<B, 4>(inputs.q);
        let k = float::<B, 4>(inputs.k);
        let v = float::<B, 4>(inputs.v);
        let [batch, heads, q_len, head_dim] = q.dims();
        let [k_batch, kv_heads, k_len, k_dim] = k.dims();
        assert!(
            k_batch == batch && k_dim == head_dim,
            "attention: q is {:?} but k is {:?}",
            q.dims(),
            k.dims()
        );
        assert_eq!(v.dims(), k.dims(), "attention: k and v differ in shape");
        assert!(q_len > 0, "attention: no queries");
        assert!(
            kv_heads > 0 && heads % kv_heads == 0,
            "attention: {heads} query heads are not a multiple of {kv_heads} kv heads"
        );
        assert_eq!(
            inputs.query_segments.shape().as_slice(),
            &[batch, q_len],
            "attention: query segments do not match q"
        );
        assert_eq!(
            inputs.key_segments.shape().as_slice(),
            &[batch, k_len],
            "attention: key segments do not match k"
        );
        let dtype = q.dtype();
        assert!(
            k.dtype() == dtype && v.dtype() == dtype,
            "attention: q, k and v must share a dtype"
        );
        let positions = positions::<B>(params.query_offset + q_len, k_len, &q.device());
        let segments = CallSegments {
            query_segments: inputs.query_segments,
            key_segments: inputs.key_segments,
            positions: positions.into_primitive(),
        };
        Self {
            q,
            k,
            v,
            segments,
            batch,
            heads,
            kv_heads,
            q_len,
            k_len,
            head_dim,
            dtype,
            // Computed in f64 and rounded once, as the reference's `mul_scalar` does.
            scale: (head_dim as f64).powf(-0.5) as f32,
            params: *params,
        }
    }

    fn n_rep(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// The query chunks, each with the key range it can see: nothing after its last query
    /// (causal), and with a window nothing before its first query's window.
    fn blocks(&self) -> impl Iterator<Item = Block> + use<B> {
        let plan = AttentionPlan::new(
            self.batch,
            self.heads,
            self.q_len,
            self.k_len,
            self.params.chunk_memory_bytes,
        );
        let (offset, window, k_len) = (self.params.query_offset, self.params.window, self.k_len);
        chunks(self.q_len, plan.query_rows).map(move |(q_start, rows)| {
            let first = offset + q_start;
            let k_end = (first + rows).min(k_len);
            let k_start = window
                .map_or(0, |w| (first + 1).saturating_sub(w))
                .min(k_end);
            Block {
                q_start,
                rows,
                k_start,
                keys: k_end - k_start,
            }
        })
    }

    /// Rows `block` of a `[batch, heads, q_len, head_dim]` tensor, grouped by kv head.
    ///
    /// # Shapes
    /// - output: `[batch, kv_heads, n_rep * rows, head_dim]`
    fn grouped(&self, x: &Tensor<B, 4>, block: Block) -> Tensor<B, 4> {
        // [batch, heads, rows, d] -> [batch, kv_heads, n_rep * rows, d]
        x.clone().narrow(2, block.q_start, block.rows).reshape([
            self.batch,
            self.kv_heads,
            self.n_rep() * block.rows,
            self.head_dim,
        ])
    }

    /// The inverse of [`grouped`](Self::grouped).
    fn ungrouped(&self, x: Tensor<B, 4>, block: Block) -> Tensor<B, 4> {
        // [batch, kv_heads, n_rep * rows, d] -> [batch, heads, rows, d]
        x.reshape([self.batch, self.heads, block.rows, self.head_dim])
    }

    /// The keys (or values) `block` sees.
    ///
    /// # Shapes
    /// - output: `[batch, kv_heads, keys, head_dim]`
    fn key_rows(&self, x: &Tensor<B, 4>, block: Block) -> Tensor<B, 4> {
        x.clone().narrow(2, block.k_start, block.keys)
    }

    /// Where `block` sits, for the block softmax.
    fn score_block(&self, block: Block) -> ScoreBlock {
        ScoreBlock {
            batch: self.batch,
            kv_heads: self.kv_heads,
            n_rep: self.n_rep(),
            q_start: block.q_start,
            rows: block.rows,
            k_start: block.k_start,
            keys: block.keys,
            query_offset: self.params.query_offset,
            window: self.params.window,
            scale: self.scale,
        }
    }
}

/// Forward: the output and the per-row log-sum-exp, one query chunk at a time.
///
/// # Shapes
/// - inputs: see [`AttentionInputs`]
/// - output: `[batch, heads, q_len, head_dim]` in the inputs' dtype, and
///   `lse`: `[batch, heads, q_len]` f32
pub fn forward<B: AttentionBackend>(
    inputs: AttentionInputs<B>,
    params: &AttentionParams,
) -> AttentionForward<B> {
    let p = Problem::new(inputs, params);
    let device = p.q.device();
    let (batch, heads, d) = (p.batch, p.heads, p.head_dim);

    let mut outputs = Vec::new();
    let mut lses = Vec::new();
    for block in p.blocks() {
        if block.keys == 0 {
            // Every row of the chunk sees no key.
            outputs.push(Tensor::zeros(
                [batch, heads, block.rows, d],
                (&device, p.dtype),
            ));
            lses.push(Tensor::full(
                [batch, heads, block.rows],
                f32::INFINITY,
                (&device, DType::F32),
            ));
            continue;
        }
        let q = p.grouped(&p.q, block); // [batch, kv_heads, n_rep * rows, d]
        let k = p.key_rows(&p.k, block); // [batch, kv_heads, keys, d]
        let v = p.key_rows(&p.v, block);
        let scores = gemm(q, k, false, true); // [batch, kv_heads, n_rep * rows, keys]
        let softmax = B::attention_softmax(primitive(scores), &p.segments, &p.score_block(block));
        // 0 in a row that sees no key, whose probabilities are all 0.
        let out = gemm(float::<B, 4>(softmax.probs), v, false, false); // [batch, kv_heads, n_rep * rows, d]
        outputs.push(p.ungrouped(out, block));
        lses.push(float::<B, 3>(softmax.lse));
    }
    AttentionForward {
        output: primitive(Tensor::cat(outputs, 2)),
        lse: primitive(Tensor::cat(lses, 2)),
    }
}

/// `acc[:, :, start..start + n] += part`.
///
/// # Shapes
/// - acc: `[batch, kv_heads, k_len, d]`, part: `[batch, kv_heads, n, d]`
fn add_key_rows<B: Backend>(acc: &mut Tensor<B, 4>, start: usize, part: Tensor<B, 4>) {
    let [batch, kv_heads, n, d] = part.dims();
    let ranges = [0..batch, 0..kv_heads, start..start + n, 0..d];
    acc.inplace(|acc| {
        let sum = acc.clone().slice(ranges.clone()) + part;
        acc.slice_assign(ranges, sum)
    });
}

/// Backward: recomputes each chunk's scores and accumulates the gradients (see the module
/// docs for the formulas). `dK` and `dV` accumulate in f32 over the chunks.
///
/// # Shapes
/// - inputs: see [`AttentionInputs`]; `forward`, `grad_output`: as [`forward`] returns
/// - output: `[batch, heads, q_len, head_dim]` and twice `[batch, kv_heads, k_len, head_dim]`,
///   where requested, in the inputs' dtype
pub fn backward<B: AttentionBackend>(
    inputs: AttentionInputs<B>,
    forward: AttentionForward<B>,
    grad_output: FloatTensor<B>,
    params: &AttentionParams,
    request: AttentionGradRequest,
) -> AttentionGrads<B> {
    let p = Problem::new(inputs, params);
    let device = p.q.device();
    let (batch, heads, kv_heads, d) = (p.batch, p.heads, p.kv_heads, p.head_dim);
    let lse = float::<B, 3>(forward.lse).cast(FloatDType::F32);
    let grad_output = float::<B, 4>(grad_output).cast(p.dtype);
    // D = rowsum(dO * O) for every query row at once (a few kernels per call, not per chunk):
    // [batch, heads, q_len, d] -> [batch, heads, q_len]
    let delta = (request.q || request.k).then(|| {
        let output = float::<B, 4>(forward.output).cast(FloatDType::F32);
        (grad_output.clone().cast(FloatDType::F32) * output)
            .sum_dim(3)
            .reshape([batch, heads, p.q_len])
    });
    let key_grad = || Tensor::<B, 4>::zeros([batch, kv_heads, p.k_len, d], (&device, DType::F32));
    let mut grad_k = request.k.then(key_grad);
    let mut grad_v = request.v.then(key_grad);
    let mut grad_q = Vec::new();

    for block in p.blocks() {
        if block.keys == 0 {
            if request.q {
                grad_q.push(Tensor::zeros(
                    [batch, heads, block.rows, d],
                    (&device, p.dtype),
                ));
            }
            continue;
        }
        let q = p.grouped(&p.q, block); // [batch, kv_heads, n_rep * rows, d]
        let k = p.key_rows(&p.k, block); // [batch, kv_heads, keys, d]
        let v = p.key_rows(&p.v, block);
        let grad_out = p.grouped(&grad_output, block); // [batch, kv_heads, n_rep * rows, d]
        let scores = gemm(q.clone(), k.clone(), false, true); // [batch, kv_heads, n_rep * rows, keys]
        // dP = dO V^T, with D, where dS is needed.
        let grad = delta.as_ref().map(|delta| {
            let grad_probs = gemm(grad_out.clone(), v, false, true);
            (primitive(grad_probs), primitive(delta.clone()))
        });
        let softmax = B::attention_softmax_backward(
            primitive(scores),
            primitive(lse.clone()),
            grad,
            &p.segments,
            &p.score_block(block),
        );

        if let Some(grad_v) = grad_v.as_mut() {
            // [batch, kv_heads, keys, n_rep * rows] @ [.., n_rep * rows, d]: sums the heads too.
            let probs = float::<B, 4>(softmax.probs);
            let part = gemm(probs, grad_out, true, false).cast(FloatDType::F32); // [batch, kv_heads, keys, d]
            add_key_rows(grad_v, block.k_start, part);
        }
        // The gradient of the unscaled `q k^T`: [batch, kv_heads, n_rep * rows, keys]
        let Some(grad_scores) = softmax.grad_scores.map(float::<B, 4>) else {
            continue;
        };
        if request.q {
            let part = gemm(grad_scores.clone(), k, false, false); // [batch, kv_heads, n_rep * rows, d]
            grad_q.push(p.ungrouped(part, block));
        }
        if let Some(grad_k) = grad_k.as_mut() {
            // [batch, kv_heads, keys, n_rep * rows] @ [.., n_rep * rows, d]: sums the heads too.
            let part = gemm(grad_scores, q, true, false).cast(FloatDType::F32); // [batch, kv_heads, keys, d]
            add_key_rows(grad_k, block.k_start, part);
        }
    }

    AttentionGrads {
        q: request.q.then(|| primitive(Tensor::cat(grad_q, 2))),
        k: grad_k.map(|g| primitive(g.cast(p.dtype))),
        v: grad_v.map(|g| primitive(g.cast(p.dtype))),
    }
}
