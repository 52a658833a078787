//! [`LinearBackend::gemm`](super::LinearBackend::gemm) on cuBLASLt for burn-cuda tensors.
//!
//! cuBLASLt is loaded at run time through `cudarc`, like the rest of the CUDA stack here, and
//! multiplies burn's buffers in place. Three facts shape the code (found with the probe in
//! `shared/probes/cublaslt-on-burn-cuda` and read in cubecl-cuda 0.10's sources):
//!
//! - burn-cuda may pitch rows: a row's stride can exceed its length, so each leading
//!   dimension is read from the tensor's strides, never from its shape;
//! - cubecl-cuda runs its kernels on a non-blocking CUDA stream that it does not expose, so a
//!   product on our stream is ordered by host syncs: wait for cubecl's stream (which also
//!   makes the output's allocation real), run, wait for ours. That costs tens of microseconds
//!   a call; docs/ARCHITECTURE.md ("GPU speed") says what was tried to remove it;
//! - row-major `C = op(A) op(B)` is column-major `C^T = op(B)^T op(A)^T`, so the operands go to
//!   cuBLASLt swapped, each with its own transpose flag.
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

use burn::tensor::{DType, Shape};
use burn_cubecl::CubeRuntime;
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use cudarc::cublaslt::{CudaBlasLT, Matmul, MatmulConfig};
use cudarc::driver::{CudaContext, CudaStream, DeviceRepr};

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

/// A 2-D tensor whose rows are unit-stride and do not overlap, as cuBLASLt's leading dimension
/// needs (a transposed or broadcast view is copied first).
fn rows_unit_stride(t: &Tensor) -> Option<Tensor> {
    if t.meta.num_dims() != 2 {
        return None;
    }
    let (strides, cols) = (t.meta.strides(), t.meta.shape()[1]);
    Some(if strides[1] == 1 && strides[0] >= cols {
        t.clone()
    } else {
        into_contiguous(t.clone())
    })
}

/// `[rows, cols]` and the row stride of a 2-D tensor.
fn layout(t: &Tensor) -> (usize, usize, usize) {
    let shape = t.meta.shape();
    (shape[0], shape[1], t.meta.strides()[0])
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
    let (a, b) = (rows_unit_stride(a)?, rows_unit_stride(b)?);
    let (a_rows, a_cols, lda) = layout(&a);
    let (b_rows, b_cols, ldb) = layout(&b);
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
    assert_eq!(k, k_b, "gemm: inner dimensions differ ({k} and {k_b})");

    let c = empty_device_dtype(
        a.client.clone(),
        a.device.clone(),
        Shape::new([m, n]),
        a.dtype,
    );
    let ldc = c.meta.strides()[0];
    let (pa, _keep_a) = address(&a)?;
    let (pb, _keep_b) = address(&b)?;
    let (pc, _keep_c) = address(&c)?;
    let config = MatmulConfig {
        // Column-major C^T [n, m] = op(B)^T [n, k] @ op(A)^T [k, m].
        transa: transpose_b,
        transb: transpose_a,
        transc: false,
        m: n as u64,
        n: m as u64,
        k: k as u64,
        alpha: 1.0,
        lda: ldb as i64,
        ldb: lda as i64,
        beta: 0.0,
        ldc: ldc as i64,
        stride_a: None,
        stride_b: None,
        stride_c: None,
        stride_bias: None,
        batch_size: None,
    };
    let lengths = [a_rows * lda, b_rows * ldb, m * ldc];
    // Wait for cubecl's stream: the inputs are written and the output allocated.
    burn_cubecl::cubecl::future::block_on(a.client.sync()).ok()?;
    let done = with_blas(a.device.index, |blas| match a.dtype {
        DType::BF16 => run::<half::bf16>(blas, config, pb, pa, pc, lengths),
        DType::F16 => run::<half::f16>(blas, config, pb, pa, pc, lengths),
        _ => run::<f32>(blas, config, pb, pa, pc, lengths),
    })?;
    if let Err(err) = done {
        panic!(
            "cuBLASLt matmul [{m}, {k}] x [{k}, {n}] ({:?}) failed: {err} \
             (`--gemm burn` avoids this path)",
            a.dtype
        );
    }
    Some(c)
}

/// Runs one product on `blas`'s stream and waits for it. `first` and `second` are cuBLASLt's
/// A and B (our B and A, see the module docs); `lengths` are `[our a, our b, c]` in elements.
fn run<T: DeviceRepr>(
    blas: &Blas,
    config: MatmulConfig,
    first: u64,
    second: u64,
    out: u64,
    lengths: [usize; 3],
) -> Result<(), Box<dyn std::error::Error>>
where
    CudaBlasLT: Matmul<T>,
{
    // SAFETY: the addresses are live burn buffers (their guards outlive this call) of at least
    // these lengths; the slices are leaked, so cudarc never frees burn's memory.
    unsafe {
        let first = blas.stream.upgrade_device_ptr::<T>(first, lengths[1]);
        let second = blas.stream.upgrade_device_ptr::<T>(second, lengths[0]);
        let mut out = blas.stream.upgrade_device_ptr::<T>(out, lengths[2]);
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
