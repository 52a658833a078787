//! [`GemmBackend::gemm`](crate::GemmBackend::gemm) on cuBLASLt for burn-cuda tensors.
//!
//! cuBLASLt is loaded at run time through `cudarc`, like the rest of the CUDA stack here, and
//! multiplies burn's buffers in place. These facts shape the code (found with the probe in
//! `shared/probes/cublaslt-on-burn-cuda` and read in cubecl-cuda 0.10's sources):
//!
//! - burn-cuda may pitch rows: a row's stride can exceed its length, so each leading
//!   dimension is read from the tensor's strides, never from its shape;
//! - cubecl-cuda runs its kernels on a non-blocking CUDA stream that it does not expose, so a
//!   product on our stream is ordered by host syncs: wait for cubecl's stream (which also
//!   makes the output's allocation real), run, wait for ours. That costs tens of microseconds
//!   a call; docs/ARCHITECTURE.md ("GPU speed") says what was tried to remove it;
//! - row-major `C = op(A) op(B)` is column-major `C^T = op(B)^T op(A)^T`, so the operands go to
//!   cuBLASLt swapped, each with its own transpose flag;
//! - a batch is one strided-batched call: each operand's leading dimensions must collapse into
//!   one stride (a narrowed key range of `[batch, heads, len, d]` does), else it is copied.
//!
//! bf16, f16 and f32 are supported (f32 with TF32 tensor cores, as burn's own CUDA matmul).
//! Anything else, or a machine where cuBLASLt does not load, takes burn's matmul, and the
//! latter is said once on stderr.

// Raw device pointers handed to cuBLASLt through cudarc: the one place in the workspace that
// needs `unsafe`, each block with its SAFETY note.
#![allow(unsafe_code)]

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use burn::tensor::DType;
use burn_cubecl::CubeRuntime;
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use cudarc::cublaslt::{CudaBlasLT, Matmul, MatmulConfig};
use cudarc::driver::{CudaContext, CudaStream, DeviceRepr};

use crate::{gemm_shape, record_call};

type Tensor = CubeTensor<CudaRuntime>;

/// Whether `R` is CUDA: the cubecl impl is generic over runtimes, and only CUDA has cuBLASLt.
pub(super) fn is_cuda<R: CubeRuntime>() -> bool {
    TypeId::of::<R>() == TypeId::of::<CudaRuntime>()
}

/// `op(a) @ op(b)` on cuBLASLt, or `None` where it does not apply (another runtime, dtype or
/// rank, or no cuBLASLt), for the caller to run burn's matmul instead.
pub(super) fn gemm<R: CubeRuntime>(
    a: &CubeTensor<R>,
    b: &CubeTensor<R>,
    transpose_a: bool,
    transpose_b: bool,
) -> Option<CubeTensor<R>> {
    let a = (a as &dyn Any).downcast_ref::<Tensor>()?;
    let b = (b as &dyn Any).downcast_ref::<Tensor>()?;
    let c = gemm_cuda(a, b, transpose_a, transpose_b)?;
    let c: Box<dyn Any> = Box::new(c);
    c.downcast::<CubeTensor<R>>().ok().map(|c| *c)
}

/// One cuBLASLt handle and stream per device.
struct Blas {
    stream: Arc<CudaStream>,
    blas: CudaBlasLT,
}

/// The handle of device `index`, created on first use; `None` if cuBLASLt does not load there.
fn with_blas<T>(index: usize, f: impl FnOnce(&Blas) -> T) -> Option<T> {
    static HANDLES: OnceLock<Mutex<HashMap<usize, Option<Blas>>>> = OnceLock::new();
    let mut handles = HANDLES.get_or_init(Default::default).lock().ok()?;
    let blas = handles.entry(index).or_insert_with(|| match create(index) {
        Ok(blas) => Some(blas),
        Err(err) => {
            eprintln!("qwen-model: cuBLASLt unavailable on CUDA device {index} ({err}); linear layers use burn's matmul");
            None
        }
    });
    blas.as_ref().map(f)
}

fn create(index: usize) -> Result<Blas, Box<dyn std::error::Error>> {
    // The primary context, the one cubecl-cuda uses: its device pointers are valid here.
    let ctx = CudaContext::new(index)?;
    // Ordering is by host syncs (module docs), so cudarc's per-buffer events would only cost.
    // SAFETY: the context is new and ours; nothing has recorded events on it yet.
    unsafe { ctx.disable_event_tracking() };
    let stream = ctx.new_stream()?;
    let blas = CudaBlasLT::new(stream.clone())?;
    Ok(Blas { stream, blas })
}

/// A `[..batch, rows, cols]` operand as cuBLASLt reads it: unit-stride rows `ld` elements
/// apart, and the batch dimensions collapsed into one of stride `batch_stride`.
struct Operand {
    tensor: Tensor,
    batch: usize,
    rows: usize,
    cols: usize,
    ld: usize,
    batch_stride: usize,
}

impl Operand {
    /// The tensor as it lies, or a contiguous copy where its layout does not fit (a transposed
    /// or broadcast view, batch dimensions that do not collapse).
    fn new(t: &Tensor) -> Self {
        Self::strided(t).unwrap_or_else(|| {
            Self::strided(&into_contiguous(t.clone())).expect("a contiguous tensor fits")
        })
    }

    fn strided(t: &Tensor) -> Option<Self> {
        let (shape, strides) = (t.meta.shape(), t.meta.strides());
        let rank = shape.num_dims();
        let (rows, cols, ld) = (shape[rank - 2], shape[rank - 1], strides[rank - 2]);
        if strides[rank - 1] != 1 || ld < cols {
            return None;
        }
        // Outer batch dimensions must step over whole inner ones: stride[i] = stride[i+1] * size.
        let (mut batch, mut batch_stride) = (1, None);
        for dim in (0..rank - 2).rev().filter(|&dim| shape[dim] != 1) {
            match batch_stride {
                None => batch_stride = Some(strides[dim]),
                Some(inner) if strides[dim] == inner * batch => {}
                Some(_) => return None,
            }
            batch *= shape[dim];
        }
        Some(Self {
            tensor: t.clone(),
            batch,
            rows,
            cols,
            ld,
            batch_stride: batch_stride.unwrap_or(rows * ld),
        })
    }

    /// The elements from the first to one past the last, for cudarc's bounds.
    fn span(&self) -> usize {
        (self.batch - 1) * self.batch_stride + (self.rows - 1) * self.ld + self.cols
    }
}

/// The device address of a tensor's first element; the resource guard keeps the buffer alive.
fn address(t: &Tensor) -> Option<(u64, impl Sized + use<>)> {
    let resource = t.client.get_resource(t.handle.clone()).ok()?;
    Some((resource.resource().ptr, resource))
}

fn gemm_cuda(a: &Tensor, b: &Tensor, transpose_a: bool, transpose_b: bool) -> Option<Tensor> {
    if a.dtype != b.dtype || !matches!(a.dtype, DType::BF16 | DType::F16 | DType::F32) {
        return None;
    }
    let shape = gemm_shape(a.meta.shape(), b.meta.shape(), transpose_a, transpose_b);
    if shape.num_elements() == 0 || a.meta.shape().num_elements() == 0 {
        return None;
    }
    let (a, b) = (Operand::new(a), Operand::new(b));
    let rank = shape.num_dims();
    let (m, n) = (shape[rank - 2], shape[rank - 1]);
    let k = if transpose_a { a.rows } else { a.cols };
    let c = empty_device_dtype(
        a.tensor.client.clone(),
        a.tensor.device.clone(),
        shape,
        a.tensor.dtype,
    );
    let c = Operand::strided(&c)?;
    let (pa, _keep_a) = address(&a.tensor)?;
    let (pb, _keep_b) = address(&b.tensor)?;
    let (pc, _keep_c) = address(&c.tensor)?;
    let batched = c.batch > 1;
    let config = MatmulConfig {
        // Column-major C^T [n, m] = op(B)^T [n, k] @ op(A)^T [k, m].
        transa: transpose_b,
        transb: transpose_a,
        transc: false,
        m: n as u64,
        n: m as u64,
        k: k as u64,
        alpha: 1.0,
        lda: b.ld as i64,
        ldb: a.ld as i64,
        beta: 0.0,
        ldc: c.ld as i64,
        stride_a: batched.then_some(b.batch_stride as i64),
        stride_b: batched.then_some(a.batch_stride as i64),
        stride_c: batched.then_some(c.batch_stride as i64),
        stride_bias: None,
        batch_size: batched.then_some(i32::try_from(c.batch).ok()?),
    };
    let spans = [a.span(), b.span(), c.span()];
    let dtype = a.tensor.dtype;
    // Wait for cubecl's stream: the inputs are written and the output allocated.
    let started = Instant::now();
    burn_cubecl::cubecl::future::block_on(a.tensor.client.sync()).ok()?;
    let waited = started.elapsed();
    let done = with_blas(a.tensor.device.index, |blas| match dtype {
        DType::BF16 => run::<half::bf16>(blas, config, pb, pa, pc, spans),
        DType::F16 => run::<half::f16>(blas, config, pb, pa, pc, spans),
        _ => run::<f32>(blas, config, pb, pa, pc, spans),
    })?;
    record_call(waited, started.elapsed() - waited);
    if let Err(err) = done {
        panic!(
            "cuBLASLt matmul {:?} x {:?} ({dtype:?}, transposed: {transpose_a}, {transpose_b}) \
             failed: {err} (`--gemm burn` avoids this path)",
            a.tensor.meta.shape(),
            b.tensor.meta.shape(),
        );
    }
    Some(c.tensor)
}

/// Runs one product on `blas`'s stream and waits for it. `first` and `second` are cuBLASLt's
/// A and B (our B and A, see the module docs); `spans` are `[our a, our b, c]` in elements.
fn run<T: DeviceRepr>(
    blas: &Blas,
    config: MatmulConfig,
    first: u64,
    second: u64,
    out: u64,
    spans: [usize; 3],
) -> Result<(), Box<dyn std::error::Error>>
where
    CudaBlasLT: Matmul<T>,
{
    // SAFETY: the addresses are live burn buffers (their guards outlive this call) of at least
    // these lengths; the slices are leaked, so cudarc never frees burn's memory.
    unsafe {
        let first = blas.stream.upgrade_device_ptr::<T>(first, spans[1]);
        let second = blas.stream.upgrade_device_ptr::<T>(second, spans[0]);
        let mut out = blas.stream.upgrade_device_ptr::<T>(out, spans[2]);
        let result = blas
            .blas
            .matmul(config, &first, &second, &mut out, None, None);
        first.leak();
        second.leak();
        out.leak();
        result?;
    }
    blas.stream.synchronize()?;
    Ok(())
}
