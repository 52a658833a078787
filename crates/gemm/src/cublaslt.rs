//! [`GemmBackend::gemm`](crate::GemmBackend::gemm) on cuBLASLt for burn-cuda tensors.
//!
//! cuBLASLt is loaded at run time through `cudarc`, like the rest of the CUDA stack here, and
//! multiplies burn's buffers in place. These facts shape the code (found with the probe in
//! `shared/probes/cublaslt-on-burn-cuda` and read in cubecl-cuda 0.10's sources):
//!
//! - burn-cuda may pitch rows: a row's stride can exceed its length, so each leading
//!   dimension is read from the tensor's strides, never from its shape;
//! - cubecl-cuda runs its kernels on a non-blocking CUDA stream, launched from a device thread
//!   that takes tasks in order. With `GemmBody::Cublaslt` a product is such a task: the
//!   patched cubecl-cuda (`vendor/README.md`) hands it the stream and the buffers' addresses,
//!   and cuBLASLt runs there, between the kernels before and after it, with no host wait. With
//!   `GemmBody::CublasltHostSync` it runs on a stream of ours instead, ordered by host waits:
//!   wait for cubecl's stream, run, wait for ours (about a hundred microseconds a product and
//!   an idle GPU meanwhile; docs/ARCHITECTURE.md, "GPU speed");
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

mod plans;

use std::any::Any;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use burn::tensor::{DType, Shape};
use burn_cubecl::CubeRuntime;
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::{empty_device_contiguous_dtype, empty_device_dtype};
use burn_cubecl::tensor::CubeTensor;
use cudarc::cublaslt::{CudaBlasLT, Matmul, MatmulConfig, MatmulShared};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DeviceRepr};

use cudarc::driver::sys::CUstream;

#[cfg(doc)]
use crate::gemm_shape;
use crate::{BatchedLayout, GemmBody, record_call};

type Tensor = CubeTensor<CudaRuntime>;

/// `op(a) @ op(b)` on cuBLASLt, or `None` where it does not apply (another runtime, dtype or
/// rank, or no cuBLASLt), for the caller to run burn's matmul instead. `shape` is the output's,
/// as [`gemm_shape`] checked it.
/// With `acc`, the product is added to it (`beta = 1`, one rounding to `out`, which must be
/// `acc`'s dtype) and written to a new tensor laid out as `acc`, which must be laid out as a
/// fresh output would be (else `None`).
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm<R: CubeRuntime>(
    body: GemmBody,
    a: &CubeTensor<R>,
    b: &CubeTensor<R>,
    transpose_a: bool,
    transpose_b: bool,
    shape: Shape,
    out: DType,
    acc: Option<&CubeTensor<R>>,
) -> Option<CubeTensor<R>> {
    let a = (a as &dyn Any).downcast_ref::<Tensor>()?;
    let b = (b as &dyn Any).downcast_ref::<Tensor>()?;
    let acc = match acc {
        Some(acc) => Some((acc as &dyn Any).downcast_ref::<Tensor>()?),
        None => None,
    };
    let c = gemm_cuda(body, a, b, transpose_a, transpose_b, shape, out, acc)?;
    let c: Box<dyn Any> = Box::new(c);
    c.downcast::<CubeTensor<R>>().ok().map(|c| *c)
}

/// A cuBLASLt handle and the stream it runs on.
struct Blas {
    stream: Arc<CudaStream>,
    blas: CudaBlasLT,
    /// For `GemmBody::CublasltCached`: the plans by shape and their workspace, made on first
    /// use (so the other bodies allocate no second workspace).
    cached: RefCell<Option<Cached>>,
}

/// The bytes of the cached plans' workspace: what cudarc gives its own on compute capability
/// 9 and up (the H200's), more than any algorithm the heuristic picks here asks for.
const WORKSPACE_BYTES: usize = 32 << 20;

struct Cached {
    plans: plans::Plans,
    /// Kept alive as long as the plans run; `address` is its device address.
    _workspace: CudaSlice<u8>,
    address: u64,
}

/// Where a handle runs its products.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum StreamKind {
    /// A stream of our own, ordered with cubecl's by host waits.
    Own,
    /// cubecl's stream (the raw handle), for tasks on cubecl's device thread.
    Cubecl(usize),
}

/// The handle of device `index` on `kind`, created on first use; `None` if cuBLASLt does not
/// load there (said once on stderr).
fn with_blas<T>(index: usize, kind: StreamKind, f: impl FnOnce(&Blas) -> T) -> Option<T> {
    type Handles = HashMap<(usize, StreamKind), Option<Blas>>;
    static HANDLES: OnceLock<Mutex<Handles>> = OnceLock::new();
    let mut handles = HANDLES.get_or_init(Default::default).lock().ok()?;
    let blas = handles
        .entry((index, kind))
        .or_insert_with(|| match create(index, kind) {
            Ok(blas) => Some(blas),
            Err(err) => {
                eprintln!("qwen-gemm: cuBLASLt unavailable on CUDA device {index} ({err}); products use burn's matmul");
                None
            }
        });
    blas.as_ref().map(f)
}

fn create(index: usize, kind: StreamKind) -> Result<Blas, Box<dyn std::error::Error>> {
    // The primary context, the one cubecl-cuda uses: its device pointers are valid here.
    let ctx = CudaContext::new(index)?;
    // Ordering is ours (module docs), so cudarc's per-buffer events would only cost.
    // SAFETY: the context is new and ours; nothing has recorded events on it yet.
    unsafe { ctx.disable_event_tracking() };
    let stream = match kind {
        StreamKind::Own => ctx.new_stream()?,
        // SAFETY: cubecl's stream of this context, alive as long as its server (the process);
        // work on it is ordered by running on cubecl's device thread (`gemm_on_cubecl_stream`).
        StreamKind::Cubecl(raw) => unsafe { ctx.wrap_borrowed_stream(raw as CUstream) },
    };
    let blas = CudaBlasLT::new(stream.clone())?;
    Ok(Blas {
        stream,
        blas,
        cached: RefCell::new(None),
    })
}

/// An operand as cuBLASLt reads it: the tensor and its [`BatchedLayout`].
struct Operand {
    tensor: Tensor,
    layout: BatchedLayout,
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
        let layout = BatchedLayout::of(t.meta.shape(), t.meta.strides())?;
        Some(Self {
            tensor: t.clone(),
            layout,
        })
    }
}

/// The device address of a tensor's first element; the resource guard keeps the buffer alive.
fn address(t: &Tensor) -> Option<(u64, impl Sized + use<>)> {
    let resource = t.client.get_resource(t.handle.clone()).ok()?;
    Some((resource.resource().ptr, resource))
}

#[allow(clippy::too_many_arguments)]
fn gemm_cuda(
    body: GemmBody,
    a: &Tensor,
    b: &Tensor,
    transpose_a: bool,
    transpose_b: bool,
    shape: Shape,
    out: DType,
    acc: Option<&Tensor>,
) -> Option<Tensor> {
    // The product in the inputs' dtype, or half-precision inputs into f32 (a mixed plan).
    let mixed = matches!(a.dtype, DType::BF16 | DType::F16) && out == DType::F32;
    if a.dtype != b.dtype
        || !matches!(a.dtype, DType::BF16 | DType::F16 | DType::F32)
        || !(out == a.dtype || mixed)
        || !cublaslt_present()
    {
        return None;
    }
    if shape.num_elements() == 0 || a.meta.shape().num_elements() == 0 {
        return None;
    }
    let (a, b) = (Operand::new(a), Operand::new(b));
    let rank = shape.num_dims();
    let (m, n) = (shape[rank - 2], shape[rank - 1]);
    let k = if transpose_a {
        a.layout.rows
    } else {
        a.layout.cols
    };
    // Rows packed where that keeps them 16-byte aligned (every model width here): a pitched
    // buffer (cubecl's default layout) would make later reshapes that merge its dimensions
    // copy it.
    let (client, device) = (a.tensor.client.clone(), a.tensor.device.clone());
    let c = if (n * out.size()).is_multiple_of(16) {
        empty_device_contiguous_dtype(client, device, shape, out)
    } else {
        empty_device_dtype(client, device, shape, out)
    };
    let c = Operand::strided(&c)?;
    // The accumulator is cuBLASLt's C, read with the output's layout.
    let acc = match acc {
        Some(acc) if acc.dtype == out && Operand::strided(acc)?.layout == c.layout => {
            Some(acc.clone())
        }
        Some(_) => return None,
        None => None,
    };
    let batched = c.layout.batch > 1;
    let config = MatmulConfig {
        // Column-major C^T [n, m] = op(B)^T [n, k] @ op(A)^T [k, m].
        transa: transpose_b,
        transb: transpose_a,
        transc: false,
        m: n as u64,
        n: m as u64,
        k: k as u64,
        alpha: 1.0,
        lda: b.layout.ld as i64,
        ldb: a.layout.ld as i64,
        beta: if acc.is_some() { 1.0 } else { 0.0 },
        ldc: c.layout.ld as i64,
        stride_a: batched.then_some(b.layout.batch_stride as i64),
        stride_b: batched.then_some(a.layout.batch_stride as i64),
        stride_c: batched.then_some(c.layout.batch_stride as i64),
        stride_bias: None,
        batch_size: batched.then_some(i32::try_from(c.layout.batch).ok()?),
    };
    let spans = [a.layout.span(), b.layout.span(), c.layout.span()];
    let product = Product {
        config,
        spans,
        dtype: a.tensor.dtype,
        out,
        // cudarc's typed `matmul` writes the inputs' type only, and into its C: a mixed
        // product, or one added to an accumulator, takes a plan.
        cached: body == GemmBody::CublasltCached || out != a.tensor.dtype || acc.is_some(),
        accumulates: acc.is_some(),
    };
    // The output's tensor stands in for the accumulator where there is none.
    let acc = acc.unwrap_or_else(|| c.tensor.clone());
    let started = Instant::now();
    match body {
        GemmBody::CublasltHostSync => {
            let (pa, _keep_a) = address(&a.tensor)?;
            let (pb, _keep_b) = address(&b.tensor)?;
            let (pc, _keep_c) = address(&c.tensor)?;
            let (pacc, _keep_acc) = address(&acc)?;
            // Wait for cubecl's stream: the inputs are written and the output allocated.
            burn_cubecl::cubecl::future::block_on(a.tensor.client.sync()).ok()?;
            let waited = started.elapsed();
            with_blas(a.tensor.device.index, StreamKind::Own, |blas| {
                product.launch(blas, [pa, pb, pc, pacc]);
                product.check(blas.stream.synchronize().map_err(Into::into));
            })?;
            record_call(waited, started.elapsed() - waited);
        }
        _ => {
            gemm_on_cubecl_stream(&a.tensor, [&a.tensor, &b.tensor, &c.tensor, &acc], product);
            record_call(Duration::ZERO, started.elapsed());
        }
    }
    Some(c.tensor)
}

/// Whether the cuBLASLt library loads here, looked up once; if not, stderr says so once and
/// every product takes burn's matmul.
fn cublaslt_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    *PRESENT.get_or_init(|| {
        // SAFETY: only tries to open the library by its usual names.
        let present = unsafe { cudarc::cublaslt::sys::is_culib_present() };
        if !present {
            eprintln!(
                "qwen-gemm: the cuBLASLt library does not load here; products use burn's matmul"
            );
        }
        present
    })
}

/// Queues `product` on burn's own CUDA stream ([`crate::on_burn_stream`]), between the kernels
/// queued before and after it.
fn gemm_on_cubecl_stream(on: &Tensor, [a, b, c, acc]: [&Tensor; 4], product: Product) {
    let index = on.device.index;
    crate::on_burn_stream(on, &[a, b, c, acc], move |stream, addresses| {
        let started = Instant::now();
        let ran = with_blas(index, StreamKind::Cubecl(stream as usize), |blas| {
            product.launch(
                blas,
                [addresses[0], addresses[1], addresses[2], addresses[3]],
            );
        });
        // The library loads (checked before queueing), so a missing handle is a broken setup;
        // the output is already promised to later kernels, so there is nothing to fall back to.
        assert!(
            ran.is_some(),
            "{}: no cuBLASLt handle on cubecl's stream",
            product.what()
        );
        crate::record_device_thread(started.elapsed());
    });
}

/// One product's settings, for either ordering.
struct Product {
    config: MatmulConfig,
    /// `[our a, our b, c]` in elements.
    spans: [usize; 3],
    /// The inputs' dtype, and the product's.
    dtype: DType,
    out: DType,
    /// Whether it runs through the cached plans (`GemmBody::CublasltCached`) rather than
    /// cudarc's `matmul`, which sets cuBLASLt up anew on every call.
    cached: bool,
    /// Whether the product is added to an accumulator (`beta = 1`; always a plan).
    accumulates: bool,
}

impl Product {
    /// The product as cuBLASLt sees it, for error messages (made only when one is raised, not
    /// on every product).
    fn what(&self) -> String {
        let c = &self.config;
        format!(
            "cuBLASLt matmul (column-major m {}, n {}, k {}, transposed: {}, {}, batch {:?}, {:?} into {:?}{})",
            c.m,
            c.n,
            c.k,
            c.transa,
            c.transb,
            c.batch_size,
            self.dtype,
            self.out,
            if self.accumulates {
                ", added to an accumulator"
            } else {
                ""
            }
        )
    }

    /// Puts the product on `blas`'s stream; `addresses` are our `[a, b, c, accumulator]` (the
    /// accumulator is `c` itself where there is none).
    fn launch(&self, blas: &Blas, [pa, pb, pc, pacc]: [u64; 4]) {
        // cuBLASLt's A and B are our B and A (module docs).
        if self.cached {
            self.check(self.launch_cached(blas, [pb, pa, pacc, pc]));
            return;
        }
        let done = match self.dtype {
            DType::BF16 => self.launch_typed::<half::bf16>(blas, pb, pa, pc),
            DType::F16 => self.launch_typed::<half::f16>(blas, pb, pa, pc),
            _ => self.launch_typed::<f32>(blas, pb, pa, pc),
        };
        self.check(done);
    }

    /// The product through `blas`'s cached plan of its shape; `[a, b, c, d]` are cuBLASLt's.
    fn launch_cached(
        &self,
        blas: &Blas,
        [a, b, c, d]: [u64; 4],
    ) -> Result<(), Box<dyn std::error::Error>> {
        let mut cached = blas.cached.borrow_mut();
        let cached = match &mut *cached {
            Some(cached) => cached,
            slot => {
                // SAFETY: uninitialised bytes are fine for a workspace.
                let workspace = unsafe { blas.stream.alloc::<u8>(WORKSPACE_BYTES)? };
                let (address, _) = workspace.device_ptr(&blas.stream);
                slot.insert(Cached {
                    plans: plans::Plans::default(),
                    _workspace: workspace,
                    address,
                })
            }
        };
        let key = plans::PlanKey::new(&self.config, self.dtype, self.out);
        let buffers = plans::Buffers {
            a,
            b,
            c,
            d,
            workspace: cached.address,
            workspace_bytes: WORKSPACE_BYTES,
        };
        // SAFETY: the addresses are live burn buffers of at least the product's spans (the
        // caller holds their guards or bindings until it has run), on the handle's context.
        unsafe {
            cached.plans.run(
                *blas.blas.handle(),
                blas.stream.cu_stream() as _,
                key,
                [self.config.alpha, self.config.beta],
                buffers,
            )
        }
    }

    fn check(&self, done: Result<(), Box<dyn std::error::Error>>) {
        if let Err(err) = done {
            panic!(
                "{} failed: {err} (`--gemm burn` avoids this path)",
                self.what()
            );
        }
    }

    fn launch_typed<T: DeviceRepr>(
        &self,
        blas: &Blas,
        first: u64,
        second: u64,
        out: u64,
    ) -> Result<(), Box<dyn std::error::Error>>
    where
        CudaBlasLT: Matmul<T>,
    {
        let spans = self.spans;
        // SAFETY: the addresses are live burn buffers (the caller holds their guards or
        // bindings until the product has run) of at least these lengths; the slices are
        // leaked, so cudarc never frees burn's memory.
        unsafe {
            let first = blas.stream.upgrade_device_ptr::<T>(first, spans[1]);
            let second = blas.stream.upgrade_device_ptr::<T>(second, spans[0]);
            let mut out = blas.stream.upgrade_device_ptr::<T>(out, spans[2]);
            let result = blas
                .blas
                .matmul(self.config, &first, &second, &mut out, None, None);
            first.leak();
            second.leak();
            out.leak();
            result?;
        }
        Ok(())
    }
}
