//! The chunked path: lm_head + cross-entropy without the full `[tokens, vocab]` logits.

mod autodiff;
mod backends;
#[cfg(feature = "cubecl")]
pub mod cube;
pub mod kernel;
mod plan;

pub use plan::{ChunkPlan, LIVE_TILE_BUFFERS, MIN_TILE_COLS, TILE_COL_MULTIPLE};

use burn::tensor::{
    Bool, DType, IndexingUpdateOp, Int, Tensor, TensorData, TensorPrimitive,
    backend::Backend,
    ops::{FloatTensor, IntTensor},
};

use crate::{
    CrossEntropyOptions, LossError, LossOutput, Reduction, cross_entropy::constant_zero_output,
    options::LOSS_DTYPE, targets::Targets,
};

/// The scalar settings of one chunked lm_head + loss call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LmHeadCeParams {
    /// Label smoothing `ε`, see [`CrossEntropyOptions`].
    pub label_smoothing: f32,
    /// z-loss weight `λ`, see [`CrossEntropyOptions`].
    pub z_loss_weight: f32,
    /// Bytes a tile's f32 buffers may take, see [`ChunkPlan`].
    pub chunk_memory_bytes: usize,
}

impl From<&CrossEntropyOptions> for LmHeadCeParams {
    fn from(opts: &CrossEntropyOptions) -> Self {
        Self {
            label_smoothing: opts.label_smoothing as f32,
            z_loss_weight: opts.z_loss_weight as f32,
            chunk_memory_bytes: opts.chunk_memory_bytes,
        }
    }
}

/// What [`ChunkedCeBackend::lm_head_ce_forward`] returns.
#[derive(Debug, Clone)]
pub struct LmHeadCeForward<B: Backend> {
    /// Per-row loss, `[n]`, f32.
    pub loss: FloatTensor<B>,
    /// Per-row log-sum-exp of the logits, `[n]`, f32; the backward pass reuses it.
    pub lse: FloatTensor<B>,
}

/// Which gradients [`ChunkedCeBackend::lm_head_ce_backward`] should compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GradRequest {
    /// The gradient of the hidden states.
    pub hidden: bool,
    /// The gradient of the lm_head weight.
    pub weight: bool,
}

/// What [`ChunkedCeBackend::lm_head_ce_backward`] returns, in the inputs' dtypes.
#[derive(Debug, Clone)]
pub struct LmHeadCeGrads<B: Backend> {
    /// `[n, hidden]`, when requested.
    pub hidden: Option<FloatTensor<B>>,
    /// `[vocab, hidden]`, when requested.
    pub weight: Option<FloatTensor<B>>,
}

/// The settings of one backward tile of logits, for [`ChunkedCeBackend::logits_grad`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GradTile {
    /// The vocabulary id of the tile's first column.
    pub col_start: usize,
    /// The whole vocabulary's size (label smoothing spreads `ε` over it).
    pub vocab: usize,
    /// Label smoothing `ε`.
    pub label_smoothing: f32,
}

/// Where the chunked loss's element-wise work runs as kernels of its own
/// ([`ChunkedCeBackend::logit_row_stats`] and [`ChunkedCeBackend::logits_grad`], `cube`),
/// rather than as tensor ops; set for the whole process with [`set_loss_kernels`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LossKernels {
    /// On CUDA; tensor ops elsewhere (wgpu keeps the reference path).
    #[default]
    Auto,
    /// On every CubeCL runtime (tests run them on wgpu this way).
    Kernel,
    /// Tensor ops everywhere.
    TensorOps,
}

static LOSS_KERNELS: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Sets where the loss's kernels run, for the whole process.
pub fn set_loss_kernels(setting: LossKernels) {
    LOSS_KERNELS.store(setting as u8, std::sync::atomic::Ordering::Relaxed);
}

/// The current [`LossKernels`] setting.
pub fn loss_kernels() -> LossKernels {
    match LOSS_KERNELS.load(std::sync::atomic::Ordering::Relaxed) {
        0 => LossKernels::Auto,
        1 => LossKernels::Kernel,
        _ => LossKernels::TensorOps,
    }
}

impl LossKernels {
    /// Whether a CubeCL runtime runs the kernels under this setting (`on_cuda`: whether the
    /// runtime is CUDA's).
    pub fn runs_kernels(self, on_cuda: bool) -> bool {
        match self {
            Self::Auto => on_cuda,
            Self::Kernel => true,
            Self::TensorOps => false,
        }
    }
}

/// A backend that can run the fused lm_head + cross-entropy.
///
/// The inputs are already restricted to supervised rows, so every target is in `[0, vocab)`.
///
/// - `lm_head_ce_forward` and `lm_head_ce_backward` are the two kernels. Their default bodies
///   ([`kernel::forward`], [`kernel::backward`]) use plain tensor ops in tiles set by
///   [`ChunkPlan`]; a backend with a faster fused kernel overrides them.
/// - `lm_head_cross_entropy` is the differentiable op. On a plain backend it is the forward
///   kernel. On `Autodiff<B>` it runs `B`'s forward kernel with no graph inside, and registers
///   one backward node that calls `B`'s backward kernel, which recomputes each tile's logits.
///   So autodiff never stores per-chunk logits: only the inputs and the `[n]` log-sum-exp.
/// - `logit_row_stats` and `logits_grad` are a tile's element-wise work inside the default
///   kernels; on CubeCL backends one CubeCL kernel each (`chunked/cube.rs`, where [`loss_kernels`] says).
/// - `select_unique_rows` gathers the supervised rows; its backward is a gather too.
///
/// Implemented for `Autodiff<B, C>` whenever `B` implements it, and, behind this crate's
/// features, for the Flex backend (`flex`), every CubeCL backend (`cubecl`, e.g. CUDA, WGPU)
/// and the fusion decorator (`fusion`). Another backend needs a one-line empty impl in this
/// crate (Rust's coherence rules forbid a blanket impl beside the one for `Autodiff`).
///
/// It extends qwen-gemm's `GemmBackend`: the default kernels' tile products run on its `gemm`
/// (cuBLASLt on CUDA with this crate's `cublaslt` feature).
pub trait ChunkedCeBackend: qwen_gemm::GemmBackend {
    /// Per-row loss and log-sum-exp. Not differentiable, even on `Autodiff<B>`; use
    /// [`lm_head_cross_entropy`](Self::lm_head_cross_entropy) for that.
    ///
    /// # Shapes
    /// - `hidden`: `[n, hidden]`, `weight`: `[vocab, hidden]`, `targets`: `[n]`
    fn lm_head_ce_forward(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
        params: &LmHeadCeParams,
    ) -> LmHeadCeForward<Self> {
        kernel::forward::<Self>(hidden, weight, targets, params)
    }

    /// Gradients of `sum(grad_loss * loss)` with respect to the hidden states and the weight,
    /// given the forward's `lse`.
    ///
    /// # Shapes
    /// - `hidden`: `[n, hidden]`, `weight`: `[vocab, hidden]`, `targets`, `lse`, `grad_loss`: `[n]`
    fn lm_head_ce_backward(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
        lse: FloatTensor<Self>,
        grad_loss: FloatTensor<Self>,
        params: &LmHeadCeParams,
        request: GradRequest,
    ) -> LmHeadCeGrads<Self> {
        kernel::backward::<Self>(hidden, weight, targets, lse, grad_loss, params, request)
    }

    /// Rows `rows` of `x`, all distinct; `inverse` maps each row of `x` to its place among
    /// them, or to `k` (the count) where it is not selected. On `Autodiff<B>` one node whose
    /// backward is a gather through `inverse` (of the upstream gradient with a zero row
    /// appended), not a scatter.
    ///
    /// # Shapes
    /// - `x`: `[n, hidden]`, `rows`: `[k]`, `inverse`: `[n]` in `0..=k`
    /// - output: `[k, hidden]`
    fn select_unique_rows(
        x: FloatTensor<Self>,
        rows: IntTensor<Self>,
        _inverse: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        Self::float_select(x, 0, rows)
    }

    /// What the loss needs of each row of a tile of whole rows of logits, `[rows, 3]` f32: the
    /// log-sum-exp, the target's logit and the mean logit (0 unless `with_mean` in the
    /// tensor-op body; a kernel may compute it anyway). The default body
    /// ([`kernel::logit_row_stats`]) casts the tile to f32 and reduces it in tensor ops.
    ///
    /// # Shapes
    /// - `logits`: `[rows, vocab]`, `targets`: `[rows]` in range
    fn logit_row_stats(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        with_mean: bool,
    ) -> FloatTensor<Self> {
        kernel::logit_row_stats::<Self>(logits, targets, with_mean)
    }

    /// The gradient of the summed loss with respect to a tile of logits, in their dtype (the
    /// formula at [`kernel::backward`]), given each row's `lse`, `p_scale = g (1 + 2 λ lse)`,
    /// upstream gradient `g` and target. The default body is [`kernel::logits_grad`].
    ///
    /// # Shapes
    /// - `logits`: `[rows, cols]`, vocabulary columns `tile.col_start..`
    /// - `lse`, `p_scale`, `g`: `[rows]` f32; `targets`: `[rows]` vocabulary ids
    fn logits_grad(
        logits: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        p_scale: FloatTensor<Self>,
        g: FloatTensor<Self>,
        targets: IntTensor<Self>,
        tile: GradTile,
    ) -> FloatTensor<Self> {
        kernel::logits_grad::<Self>(logits, lse, p_scale, g, targets, tile)
    }

    /// Whether [`logit_row_stats`](Self::logit_row_stats) and
    /// [`logits_grad`](Self::logits_grad) run as kernels of this crate (on CubeCL backends, as
    /// [`loss_kernels`] says); the tensor-op bodies otherwise.
    fn loss_kernels_run() -> bool {
        false
    }

    /// The differentiable per-row loss, `[n]`, f32.
    fn lm_head_cross_entropy(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
        params: &LmHeadCeParams,
    ) -> FloatTensor<Self> {
        Self::lm_head_ce_forward(hidden, weight, targets, params).loss
    }
}

/// Fused lm_head + masked cross-entropy: the same result as
/// `masked_cross_entropy(hidden @ weight^T, targets, opts)`, without ever holding the
/// `[N, vocab]` logits.
///
/// It reads the targets on the host (one sync, as the plain path does, unless they are given
/// as [`Targets::Host`]: a `&[i64]` converts), gathers the supervised rows of `hidden`, and
/// runs [`ChunkedCeBackend::lm_head_cross_entropy`] on them, in tiles bounded by
/// `opts.chunk_memory_bytes`. Under `Autodiff<B>`, backpropagating through the
/// output gives the gradients of `hidden` (zero on ignored rows) and of `weight`, recomputed
/// tile by tile in the backward pass.
///
/// The matmul runs in `hidden`'s dtype (as the model's lm_head would) and everything after it
/// in f32. The weight is `hidden`'s dtype, or an f32 master weight that the products read cast
/// on use ([`qwen_gemm::GemmBackend::cast_param`], the optimizer's kept copy where there is
/// one) and whose gradient comes in f32 with no cast. With no supervised token the loss is 0
/// and both gradients are 0.
///
/// # Shapes
/// - `hidden`: `[N, hidden]`, the final-norm output flattened from `[batch, seq, hidden]`
/// - `weight`: `[vocab, hidden]`, Hugging Face layout (`logits = hidden @ weight^T`)
/// - `targets`: `[N]`, [`Targets`] (a device tensor converts)
pub fn chunked_lm_head_cross_entropy<'a, B: ChunkedCeBackend>(
    hidden: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    targets: impl Into<Targets<'a, B>>,
    opts: &CrossEntropyOptions,
) -> Result<LossOutput<B>, LossError> {
    let targets = targets.into();
    let [n, dim] = hidden.dims();
    let [vocab, weight_dim] = weight.dims();
    let n_targets = targets.len();
    assert_eq!(
        dim, weight_dim,
        "chunked_lm_head_cross_entropy: hidden is [{n}, {dim}] but weight is [{vocab}, {weight_dim}]"
    );
    assert_eq!(
        n, n_targets,
        "chunked_lm_head_cross_entropy: hidden has {n} rows but targets have {n_targets}"
    );
    assert!(
        weight.dtype() == hidden.dtype() || weight.dtype() == DType::F32,
        "chunked_lm_head_cross_entropy: the weight is {:?}, neither hidden's {:?} nor an f32 master weight",
        weight.dtype(),
        hidden.dtype()
    );
    opts.validate()?;
    let checked = targets.check(vocab)?;
    let n_tokens = checked.rows.len();
    let device = hidden.device();
    if n == 0 {
        return Ok(constant_zero_output(0, opts.reduction, &device));
    }
    if n_tokens == 0 {
        return Ok(zero_output(hidden, weight, opts.reduction));
    }

    // Each row's place among the supervised ones, or n_tokens for an ignored row; only needed
    // where some rows are left out.
    let inverse = (n_tokens < n).then(|| {
        let mut inverse = vec![n_tokens as i64; n];
        for (place, &row) in checked.rows.iter().enumerate() {
            inverse[row as usize] = place as i64;
        }
        Tensor::<B, 1, Int>::from_data(TensorData::new(inverse, [n]), &device)
    });
    let rows = Tensor::<B, 1, Int>::from_data(TensorData::new(checked.rows, [n_tokens]), &device);
    let labels =
        Tensor::<B, 1, Int>::from_data(TensorData::new(checked.labels, [n_tokens]), &device);
    let hidden = match inverse {
        None => hidden,
        Some(inverse) => {
            let selected = B::select_unique_rows(
                hidden.into_primitive().tensor(),
                rows.clone().into_primitive(),
                inverse.into_primitive(),
            );
            Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(selected)) // [n_tokens, hidden]
        }
    };

    let per_row = B::lm_head_cross_entropy(
        hidden.into_primitive().tensor(),
        weight.into_primitive().tensor(),
        labels.into_primitive(),
        &LmHeadCeParams::from(opts),
    );
    let per_row = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(per_row)); // [n_tokens]
    let sum = per_row.clone().sum(); // [1]
    let loss = match opts.reduction {
        Reduction::Sum => sum.clone(),
        Reduction::Mean => sum.clone().div_scalar(n_tokens as f32),
        Reduction::None => Tensor::<B, 1>::zeros([n], (&device, LOSS_DTYPE)).select_assign(
            0,
            rows,
            per_row,
            IndexingUpdateOp::Add,
        ), // [N]
    };
    Ok(LossOutput {
        loss,
        sum,
        n_tokens,
    })
}

/// The loss of a batch with no supervised token: exactly 0, yet still a function of `hidden`
/// and `weight`, so that backpropagating gives them zero gradients rather than none.
fn zero_output<B: Backend>(
    hidden: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    reduction: Reduction,
) -> LossOutput<B> {
    let [n, _] = hidden.dims();
    let device = hidden.device();
    let corner = |t: Tensor<B, 2>| {
        t.narrow(0, 0, 1)
            .narrow(1, 0, 1)
            .reshape([1])
            .cast(LOSS_DTYPE)
    };
    let all: Tensor<B, 1, Bool> = Tensor::<B, 1>::zeros([1], (&device, LOSS_DTYPE)).equal_elem(0.0);
    // `mask_fill` rather than `* 0`, so that a non-finite input still gives 0, not NaN.
    let sum = (corner(hidden) + corner(weight)).mask_fill(all, 0.0); // [1]
    let loss = match reduction {
        Reduction::None => Tensor::zeros([n], (&device, LOSS_DTYPE)) + sum.clone(),
        Reduction::Sum | Reduction::Mean => sum.clone(),
    };
    LossOutput {
        loss,
        sum,
        n_tokens: 0,
    }
}
