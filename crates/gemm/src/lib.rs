//! Matrix products behind a backend trait, so that CUDA can run them on cuBLASLt while every
//! other backend keeps burn's matmul.
//!
//! ```text
//! gemm(a, b, transpose_a, transpose_b) = op(a) @ op(b)      [..batch, m, n]
//! gemm_to(a, b, transpose_a, transpose_b, out)               the same, written in `out`
//! gemm_add(a, b, transpose_a, transpose_b, acc)               acc + op(a) @ op(b)
//! ```
//!
//! [`GemmBackend::gemm`] is the one kernel: a product of the last two dimensions, batched over
//! the leading ones, each operand transposed where asked. Its default body is burn's matmul.
//! The model's linear layers, its attention and the chunked lm_head loss all multiply through
//! it, so one switch ([`set_gemm_body`]) moves every product of a training step.
//!
//! With this crate's `cublaslt` feature, CUDA (`CubeBackend<CudaRuntime, ..>`, and `Fusion` of
//! it through a custom operation) can run `gemm` on cuBLASLt, see `cublaslt.rs`. Which body runs
//! is chosen at run time with [`set_gemm_body`], for the whole process;
//! [`GemmBackend::gemm_name`] says which one a backend uses, so that a benchmark can report it.

mod backends;
#[cfg(feature = "cubecl")]
pub mod copies;
#[cfg(feature = "cublaslt")]
mod cublaslt;
mod layout;
#[cfg(feature = "cublaslt")]
pub mod nvrtc;
#[cfg(feature = "cublaslt")]
mod stream;

pub use layout::BatchedLayout;
#[cfg(feature = "cublaslt")]
pub use stream::on_burn_stream;

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, FloatDType, Shape, TensorMetadata};

/// A backend whose matrix products can run on a kernel of its own.
///
/// Implemented for `Autodiff<B, C>` whenever `B` implements it (there `gemm` is burn's
/// differentiable matmul), and, behind this crate's features, for each backend family.
pub trait GemmBackend: Backend {
    /// `op(a) @ op(b)` over the last two dimensions, batched over the leading ones, `op` a
    /// transpose where asked, in the inputs' dtype.
    ///
    /// # Shapes
    /// - `a`: `[..batch, m, k]`, or `[..batch, k, m]` with `transpose_a`
    /// - `b`: `[..batch, k, n]`, or `[..batch, n, k]` with `transpose_b`
    /// - output: `[..batch, m, n]`
    ///
    /// # Panics
    /// If the ranks or batch dimensions differ (there is no broadcasting), or the inner
    /// dimensions do not match.
    fn gemm(
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        transpose_a: bool,
        transpose_b: bool,
    ) -> FloatTensor<Self> {
        gemm_reference::<Self>(a, b, transpose_a, transpose_b)
    }

    /// [`gemm`](Self::gemm) written in `out`: where a body writes that dtype itself
    /// (cuBLASLt: bf16 or f16 inputs into f32) the product is rounded once, to `out`; elsewhere
    /// it is `gemm`'s result cast to `out`. The linear layers' weight gradients use it: f32
    /// master weights get f32 gradients without a cast kernel, as a weight's gradient in the
    /// inputs' dtype cast up would be, less its rounding to bf16.
    ///
    /// # Shapes
    /// As [`gemm`](Self::gemm).
    fn gemm_to(
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        transpose_a: bool,
        transpose_b: bool,
        out: DType,
    ) -> FloatTensor<Self> {
        cast_to::<Self>(Self::gemm(a, b, transpose_a, transpose_b), out)
    }

    /// `acc + op(a) @ op(b)`, in `acc`'s dtype: where a body adds into an accumulator itself
    /// (cuBLASLt, `beta = 1`: one kernel, the sum rounded once) the addition costs no kernel
    /// and no pass over memory of its own; elsewhere it is [`gemm_to`](Self::gemm_to) `acc`'s
    /// dtype, then an addition. The linear layers' backward adds the gradient of an input
    /// that several layers read (q, k and v read one) into what the others gave it.
    ///
    /// # Shapes
    /// As [`gemm`](Self::gemm); `acc` is shaped as the output.
    fn gemm_add(
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        transpose_a: bool,
        transpose_b: bool,
        acc: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        gemm_add_reference::<Self>(a, b, transpose_a, transpose_b, acc)
    }

    /// The body that runs [`gemm`](Self::gemm) here: a [`GemmBody::name`].
    fn gemm_name() -> &'static str {
        GemmBody::Burn.name()
    }

    /// A parameter `t` in `dtype` for compute (an f32 master weight for bf16 products, say):
    /// on CubeCL backends the copy that the optimizer kept for `t`'s value where there is one
    /// (the `copies` module, no kernel), else `t` cast. Under autodiff one node whose backward casts the
    /// gradient back to `t`'s dtype, as a cast's does.
    fn cast_param(t: FloatTensor<Self>, dtype: DType) -> FloatTensor<Self> {
        cast_to::<Self>(t, dtype)
    }
}

/// Which kernel runs [`GemmBackend::gemm`] on a backend that offers more than burn's matmul
/// (CUDA with the `cublaslt` feature). Every other backend runs burn's matmul whatever is set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum GemmBody {
    /// burn's matmul.
    Burn,
    /// cuBLASLt on burn's own CUDA stream, queued on cubecl's device thread between the
    /// kernels before and after it (through the patched cubecl-cuda, `vendor/README.md`).
    #[default]
    Cublaslt,
    /// cuBLASLt on a stream of its own, ordered with burn's by waiting on the host before and
    /// after each product: the way before the patch, kept for comparison.
    CublasltHostSync,
    /// As `Cublaslt`, but each product shape's descriptors and algorithm are made once and
    /// kept, instead of cudarc building them and querying the heuristic on every call (on
    /// cubecl's device thread, which also launches burn's kernels). Same results as `Cublaslt`
    /// on the H200 and no faster there (the step is bound by the GPU, not by that thread), so
    /// not the default.
    CublasltCached,
}

impl GemmBody {
    /// Every body, in the order of their discriminants.
    pub const ALL: [GemmBody; 4] = [
        Self::Burn,
        Self::Cublaslt,
        Self::CublasltHostSync,
        Self::CublasltCached,
    ];

    /// The name used on the command line and in benchmark reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Burn => "burn",
            Self::Cublaslt => "cublaslt",
            Self::CublasltHostSync => "cublaslt-host-sync",
            Self::CublasltCached => "cublaslt-cached",
        }
    }
}

impl std::str::FromStr for GemmBody {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|body| body.name() == name)
            .ok_or_else(|| {
                let names: Vec<_> = Self::ALL.iter().map(|body| body.name()).collect();
                format!(
                    "unknown gemm body `{name}` (expected one of {})",
                    names.join(", ")
                )
            })
    }
}

static GEMM_BODY: AtomicU8 = AtomicU8::new(GemmBody::Cublaslt as u8);

/// Picks the body of [`GemmBackend::gemm`] for the rest of the process (default
/// [`GemmBody::Cublaslt`]).
pub fn set_gemm_body(body: GemmBody) {
    GEMM_BODY.store(body as u8, Ordering::Relaxed);
}

/// The body picked by [`set_gemm_body`].
pub fn gemm_body() -> GemmBody {
    let index = usize::from(GEMM_BODY.load(Ordering::Relaxed));
    GemmBody::ALL[index.min(GemmBody::ALL.len() - 1)]
}

/// The default smallest product (in FLOPs, `2 m n k` per batch entry, summed) that goes to a
/// body other than burn's matmul; smaller ones run on burn's matmul. 0: every product. The
/// threshold exists for `cublaslt-host-sync`, whose host waits cost more than a small product
/// takes; with the stream-ordered `cublaslt` no product waits. On the H200 (0.5b, batch 8) 0 was
/// also the best host-synced setting at 2 GiB attention chunks (docs/BENCHMARKS.md).
pub const DEFAULT_MIN_FLOPS: u64 = 0;

static MIN_FLOPS: AtomicU64 = AtomicU64::new(DEFAULT_MIN_FLOPS);

/// Sets the size below which products stay on burn's matmul (see [`DEFAULT_MIN_FLOPS`]).
pub fn set_gemm_min_flops(flops: u64) {
    MIN_FLOPS.store(flops, Ordering::Relaxed);
}

/// The size set by [`set_gemm_min_flops`].
pub fn gemm_min_flops() -> u64 {
    MIN_FLOPS.load(Ordering::Relaxed)
}

/// The body of [`GemmBackend::gemm_add`] for a backend whose products do not add into an
/// accumulator: the product in `acc`'s dtype ([`GemmBackend::gemm_to`]), then an addition.
pub fn gemm_add_reference<B: GemmBackend>(
    a: FloatTensor<B>,
    b: FloatTensor<B>,
    transpose_a: bool,
    transpose_b: bool,
    acc: FloatTensor<B>,
) -> FloatTensor<B> {
    let product = B::gemm_to(a, b, transpose_a, transpose_b, acc.dtype());
    B::float_add(acc, product)
}

/// `t` in `dtype`, untouched where it already is.
pub fn cast_to<B: Backend>(t: FloatTensor<B>, dtype: DType) -> FloatTensor<B> {
    if t.dtype() == dtype {
        t
    } else {
        B::float_cast(t, FloatDType::from(dtype))
    }
}

/// Whether a product of `shape` (as [`gemm_shape`] returns) with inner dimension `k` is large
/// enough for the picked body; always false when that body is burn's matmul.
pub fn takes_picked_body(shape: &Shape, k: usize) -> bool {
    let flops = 2 * shape.num_elements() as u64 * k as u64;
    gemm_body() != GemmBody::Burn && flops >= gemm_min_flops()
}

/// Whether the CubeCL runtime `R` is CUDA's (never, in a build without the `cuda` feature):
/// the cubecl impls are generic over runtimes, and only CUDA has cuBLASLt and the kernels that
/// target it.
#[cfg(feature = "cubecl")]
#[cfg_attr(not(feature = "cuda"), allow(clippy::extra_unused_type_parameters))]
pub fn is_cuda<R: burn_cubecl::CubeRuntime>() -> bool {
    #[cfg(feature = "cuda")]
    {
        std::any::TypeId::of::<R>()
            == std::any::TypeId::of::<burn_cubecl::cubecl::cuda::CudaRuntime>()
    }
    #[cfg(not(feature = "cuda"))]
    {
        false
    }
}

/// The inner dimension of `op(a)`.
pub fn inner_dim(a: &Shape, transpose_a: bool) -> usize {
    let rank = a.num_dims();
    a[rank - 1 - usize::from(transpose_a)]
}

/// What the cuBLASLt bodies have done since the process started: how many products, and the
/// host time spent waiting for burn's stream before them and running them (with
/// `cublaslt-host-sync`: the product itself and the wait for it; with `cublaslt`: queueing it,
/// no wait). Zero on every other body. The difference between two readings is what
/// a stretch of work cost; a benchmark reports it per step.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GemmStats {
    pub calls: u64,
    pub wait_seconds: f64,
    pub run_seconds: f64,
    /// With `cublaslt`: the time cubecl's device thread spent on the products (joining the
    /// streams, cuBLASLt's descriptors, heuristic query and launch). That thread also launches
    /// every burn kernel, so this time delays them whenever the GPU is waiting for launches.
    pub device_thread_seconds: f64,
}

impl std::ops::Sub for GemmStats {
    type Output = GemmStats;

    fn sub(self, earlier: GemmStats) -> GemmStats {
        GemmStats {
            calls: self.calls - earlier.calls,
            wait_seconds: self.wait_seconds - earlier.wait_seconds,
            run_seconds: self.run_seconds - earlier.run_seconds,
            device_thread_seconds: self.device_thread_seconds - earlier.device_thread_seconds,
        }
    }
}

static CALLS: AtomicU64 = AtomicU64::new(0);
static WAIT_NANOS: AtomicU64 = AtomicU64::new(0);
static RUN_NANOS: AtomicU64 = AtomicU64::new(0);
static DEVICE_THREAD_NANOS: AtomicU64 = AtomicU64::new(0);

/// The running totals of [`GemmStats`].
pub fn gemm_stats() -> GemmStats {
    GemmStats {
        calls: CALLS.load(Ordering::Relaxed),
        wait_seconds: WAIT_NANOS.load(Ordering::Relaxed) as f64 * 1e-9,
        run_seconds: RUN_NANOS.load(Ordering::Relaxed) as f64 * 1e-9,
        device_thread_seconds: DEVICE_THREAD_NANOS.load(Ordering::Relaxed) as f64 * 1e-9,
    }
}

/// Adds one product's waits to [`gemm_stats`].
#[cfg_attr(not(feature = "cublaslt"), allow(dead_code))]
fn record_call(wait: std::time::Duration, run: std::time::Duration) {
    CALLS.fetch_add(1, Ordering::Relaxed);
    WAIT_NANOS.fetch_add(wait.as_nanos() as u64, Ordering::Relaxed);
    RUN_NANOS.fetch_add(run.as_nanos() as u64, Ordering::Relaxed);
}

/// Adds one product's time on cubecl's device thread to [`gemm_stats`].
#[cfg_attr(not(feature = "cublaslt"), allow(dead_code))]
fn record_device_thread(spent: std::time::Duration) {
    DEVICE_THREAD_NANOS.fetch_add(spent.as_nanos() as u64, Ordering::Relaxed);
}

/// The output shape of [`GemmBackend::gemm`], checking what its docs promise.
///
/// # Panics
/// As [`GemmBackend::gemm`].
pub fn gemm_shape(a: &Shape, b: &Shape, transpose_a: bool, transpose_b: bool) -> Shape {
    let rank = a.num_dims();
    assert!(
        rank >= 2 && b.num_dims() == rank && a[..rank - 2] == b[..rank - 2],
        "gemm: operands {a:?} and {b:?} need one rank (at least 2) and equal batch dimensions"
    );
    let (a_rows, a_cols) = (a[rank - 2], a[rank - 1]);
    let (b_rows, b_cols) = (b[rank - 2], b[rank - 1]);
    let (m, k) = if transpose_a {
        (a_cols, a_rows)
    } else {
        (a_rows, a_cols)
    };
    let (k_b, n) = if transpose_b {
        (b_cols, b_rows)
    } else {
        (b_rows, b_cols)
    };
    assert_eq!(
        k, k_b,
        "gemm: inner dimensions differ ({k} and {k_b}) for {a:?} x {b:?} (transposed: {transpose_a}, {transpose_b})"
    );
    let mut dims = a[..rank - 2].to_vec();
    dims.extend([m, n]);
    Shape::from(dims)
}

/// [`GemmBackend::gemm`] in burn's tensor ops (differentiable on `Autodiff<B>`).
pub fn gemm_reference<B: Backend>(
    a: FloatTensor<B>,
    b: FloatTensor<B>,
    transpose_a: bool,
    transpose_b: bool,
) -> FloatTensor<B> {
    gemm_shape(&a.shape(), &b.shape(), transpose_a, transpose_b);
    B::float_matmul(
        last_two_swapped::<B>(a, transpose_a),
        last_two_swapped::<B>(b, transpose_b),
    )
}

fn last_two_swapped<B: Backend>(x: FloatTensor<B>, swap: bool) -> FloatTensor<B> {
    let rank = x.shape().num_dims();
    if swap {
        B::float_swap_dims(x, rank - 2, rank - 1)
    } else {
        x
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::Flex;
    use burn::tensor::{Distribution, Tensor, TensorPrimitive, Tolerance};

    use super::*;

    type B = Flex;

    /// `cast_param` under autodiff: the cast's values, and the gradient cast back to the
    /// parameter's dtype, as burn's cast gives; the identity where the dtypes agree.
    #[test]
    fn cast_param_is_a_cast_under_autodiff() {
        type Ad = burn::backend::Autodiff<Flex>;
        let device = Default::default();
        let w = Tensor::<Ad, 2>::random([3, 5], Distribution::Default, &device).require_grad();
        let g = Tensor::<Ad, 2>::random([3, 5], Distribution::Default, &device).cast(DType::BF16);
        let ours = Tensor::<Ad, 2>::from_primitive(TensorPrimitive::Float(Ad::cast_param(
            w.clone().into_primitive().tensor(),
            DType::BF16,
        )));
        let theirs = w.clone().cast(DType::BF16);
        assert_eq!(ours.dtype(), DType::BF16);
        let exact = Tolerance::<f32>::absolute(0.0);
        ours.clone()
            .into_data()
            .assert_approx_eq(&theirs.clone().into_data(), exact);
        let grad_ours = w.grad(&(ours * g.clone()).sum().backward()).unwrap();
        let grad_theirs = w.grad(&(theirs * g).sum().backward()).unwrap();
        assert_eq!(grad_ours.dtype(), DType::F32);
        grad_ours
            .into_data()
            .assert_approx_eq(&grad_theirs.into_data(), exact);
        let same = Ad::cast_param(w.clone().into_primitive().tensor(), DType::F32);
        assert_eq!(same.node.id, w.into_primitive().tensor().node.id);
    }

    fn gemm<const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>, ta: bool, tb: bool) -> Tensor<B, D> {
        Tensor::from_primitive(TensorPrimitive::Float(B::gemm(
            a.into_primitive().tensor(),
            b.into_primitive().tensor(),
            ta,
            tb,
        )))
    }

    #[test]
    fn gemm_bodies_parse_from_their_names() {
        for body in GemmBody::ALL {
            assert_eq!(body.name().parse::<GemmBody>(), Ok(body));
        }
        let err = "cublas".parse::<GemmBody>().unwrap_err();
        assert!(
            err.contains("`cublas`") && err.contains("burn, cublaslt, cublaslt-host-sync"),
            "{err}"
        );
    }

    #[test]
    fn gemm_transposes_each_operand_as_asked() {
        let device = Default::default();
        let a = Tensor::<B, 2>::random([5, 3], Distribution::Default, &device);
        let b = Tensor::<B, 2>::random([3, 4], Distribution::Default, &device);
        let expected = a.clone().matmul(b.clone()).into_data();
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let a = if ta { a.clone().transpose() } else { a.clone() };
            let b = if tb { b.clone().transpose() } else { b.clone() };
            gemm(a, b, ta, tb)
                .into_data()
                .assert_approx_eq::<f32>(&expected, Tolerance::default());
        }
    }

    /// The default body: the product in the inputs' dtype, cast to `out` (bf16 into f32 here),
    /// and no cast at all where `out` is the inputs' dtype.
    #[test]
    fn gemm_to_casts_the_product() {
        let device = Default::default();
        let a = Tensor::<B, 2>::random([5, 3], Distribution::Default, &device).cast(DType::BF16);
        let b = Tensor::<B, 2>::random([4, 3], Distribution::Default, &device).cast(DType::BF16);
        let product = gemm(a.clone(), b.clone(), false, true);
        for out in [DType::F32, DType::BF16] {
            let c = B::gemm_to(
                a.clone().into_primitive().tensor(),
                b.clone().into_primitive().tensor(),
                false,
                true,
                out,
            );
            let c = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(c));
            assert_eq!(c.dtype(), out);
            c.into_data()
                .assert_eq(&product.clone().cast(out).into_data(), true);
        }
    }

    /// Each batch entry is its own product: against a loop of 2-D products.
    #[test]
    fn gemm_multiplies_each_batch_entry() {
        let device = Default::default();
        let a = Tensor::<B, 4>::random([2, 3, 4, 5], Distribution::Default, &device);
        let b = Tensor::<B, 4>::random([2, 3, 6, 5], Distribution::Default, &device);
        let c = gemm(a.clone(), b.clone(), false, true);
        assert_eq!(c.dims(), [2, 3, 4, 6]);
        for i in 0..2 {
            for j in 0..3 {
                let entry = |x: &Tensor<B, 4>, rows, cols| {
                    x.clone().slice([i..i + 1, j..j + 1]).reshape([rows, cols])
                };
                let expected = entry(&a, 4, 5).matmul(entry(&b, 6, 5).transpose());
                entry(&c, 4, 6)
                    .into_data()
                    .assert_approx_eq::<f32>(&expected.into_data(), Tolerance::default());
            }
        }
    }

    /// The only test here that touches the process-wide settings.
    #[test]
    fn small_products_stay_on_burns_matmul() {
        let shape = Shape::from(vec![4, 6]); // with k = 5: 2 * 24 * 5 = 240 FLOPs
        set_gemm_min_flops(241);
        assert!(!takes_picked_body(&shape, 5));
        set_gemm_min_flops(240);
        assert!(takes_picked_body(&shape, 5));
        set_gemm_body(GemmBody::Burn);
        assert!(!takes_picked_body(&shape, 5));
        set_gemm_body(GemmBody::default());
        set_gemm_min_flops(DEFAULT_MIN_FLOPS);
        assert_eq!(inner_dim(&Shape::from(vec![2, 5, 4]), true), 5);
    }

    #[test]
    fn gemm_shape_names_what_does_not_fit() {
        let shape = |dims: &[usize]| Shape::from(dims.to_vec());
        assert_eq!(
            gemm_shape(&shape(&[2, 4, 5]), &shape(&[2, 6, 5]), false, true),
            shape(&[2, 4, 6])
        );
        assert_eq!(
            gemm_shape(&shape(&[5, 4]), &shape(&[5, 6]), true, false),
            shape(&[4, 6])
        );
        let batch = std::panic::catch_unwind(|| {
            gemm_shape(&shape(&[2, 4, 5]), &shape(&[3, 5, 6]), false, false)
        });
        let inner =
            std::panic::catch_unwind(|| gemm_shape(&shape(&[4, 5]), &shape(&[4, 6]), false, false));
        assert!(batch.is_err() && inner.is_err());
    }
}
