//! The fused attention on CUDA: forward and backward in the FlashAttention-2 scheme on tensor
//! cores (`flash.cu`), for bf16 with head sizes 64 and 128.
//!
//! ```text
//! forward:  per 64 queries of a head, for each 64 keys they may see:
//!           S = q k^T (mma), online softmax in registers, o += P v (mma)  -> o, lse
//! backward: D = rowsum(dO o); per 64 keys and query head, for each query tile that may see
//!           them: S^T, dP^T (mma), P^T and dS^T in registers, dV += P^T dO and dK += dS^T q
//!           (registers, added to the kv head's in f32 at the end), dQ += dS k (f32, per tile)
//! ```
//!
//! Nothing of size `seq^2` is ever written to memory, and K/V are never repeated for GQA: a
//! query head reads its kv head's rows. The kernels are CUDA C compiled at run time by NVRTC (the one cubecl-cuda
//! loads), once per device and process, for the device's compute capability (8.0 or newer:
//! `mma.sync` on bf16), and run on burn's own stream through
//! [`qwen_gemm::on_burn_stream`], in order with burn's kernels and without a host wait.
//!
//! What they take ([`takes`]): bf16 `q`, `k`, `v` with `head_dim` 64
//! or 128, as many queries as keys, no query offset and no window (training); i32 segment ids; rows contiguous and every
//! other stride a multiple of 8 elements. Anything else runs the chunked attention instead; where
//! the sizes and settings fit but a layout or dtype does not, or the module does not build on
//! the machine, stderr says why, once per reason (the results are the same, the speed is not).
//!
//! The kernels' logic is tested without a GPU: `flash.cu` also compiles on the host against
//! `emulate.hpp`, and `tests/flash_emulated.rs` runs it against a plain f64 attention.

// Raw device pointers and kernel launches through cudarc.
#![allow(unsafe_code)]

use std::any::Any;
use std::sync::{Arc, Mutex, OnceLock};

use burn::tensor::{DType, Shape};
use burn_cubecl::CubeRuntime;
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaContext, CudaFunction, DeviceRepr, LaunchConfig, PushKernelArg};
use qwen_gemm::nvrtc::{Compiled, PerDevice, compile, once_per_device};

use super::AttentionParams;
use super::flash_plan::{
    backward_keys, backward_shared_bytes, backward_threads, forward_rows, forward_shared_bytes,
    forward_threads, takes,
};

type Tensor = CubeTensor<CudaRuntime>;

/// The kernels' source, compiled on first use.
pub const SOURCE: &str = include_str!("flash.cu");

/// Threads per block of the row-sum (`qf_delta_*`) kernels (4 warps).
const DELTA_THREADS: u32 = 128;

/// The forward pass's arguments, field for field `QfForward` in `flash.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct ForwardArgs {
    q: u64,
    k: u64,
    v: u64,
    query_segments: u64,
    key_segments: u64,
    out: u64,
    lse: u64,
    /// Strides of q, k, v (batch, head, row) and of the segments (batch, position).
    strides: [i64; 13],
    seq: i32,
    heads: i32,
    kv_heads: i32,
    scale_log2: f32,
}

/// `QfBackward` in `flash.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct BackwardArgs {
    q: u64,
    k: u64,
    v: u64,
    query_segments: u64,
    key_segments: u64,
    grad_out: u64,
    lse: u64,
    delta: u64,
    grad_q: u64,
    grad_k: u64,
    grad_v: u64,
    /// As [`ForwardArgs::strides`], then those of `dO`.
    strides: [i64; 16],
    seq: i32,
    heads: i32,
    kv_heads: i32,
    scale_log2: f32,
    scale: f32,
    pad: i32,
}

/// `QfDelta` in `flash.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct DeltaArgs {
    out: u64,
    grad_out: u64,
    delta: u64,
    /// Strides of o and of dO (batch, head, row).
    strides: [i64; 6],
    seq: i32,
    heads: i32,
    rows: i32,
    pad: i32,
}

// SAFETY: plain `#[repr(C)]` data laid out as the kernels' argument structs (fields of 8 bytes
// first, then of 4; no padding on either side).
unsafe impl DeviceRepr for ForwardArgs {}
// SAFETY: as above.
unsafe impl DeviceRepr for BackwardArgs {}
// SAFETY: as above.
unsafe impl DeviceRepr for DeltaArgs {}

/// The compiled kernels of one device; `[head_dim 64, head_dim 128]` each.
struct Kernels {
    ctx: Arc<CudaContext>,
    forward: [CudaFunction; 2],
    backward: [CudaFunction; 2],
    delta: [CudaFunction; 2],
}

fn dim_index(head_dim: usize) -> usize {
    usize::from(head_dim == 128)
}

/// The kernels of CUDA device `index`, built on first use; `None` where they do not build there
/// (said once on stderr).
fn kernels(index: usize) -> Option<&'static Kernels> {
    static BUILT: PerDevice<Kernels> = PerDevice::new();
    let what = "qwen-model: the fused attention";
    once_per_device(&BUILT, index, what, "the chunked attention runs", || {
        build(index)
    })
}

fn build(index: usize) -> Result<Kernels, Box<dyn std::error::Error>> {
    let Compiled {
        ctx,
        module,
        capability: (major, minor),
    } = compile(index, SOURCE)?;
    if major < 8 {
        return Err(format!("compute capability {major}.{minor}; bf16 mma needs 8.0").into());
    }
    let function =
        |name: &str, shared: usize| -> Result<CudaFunction, Box<dyn std::error::Error>> {
            let function = module.load_function(name)?;
            function.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                i32::try_from(shared)?,
            )?;
            Ok(function)
        };
    Ok(Kernels {
        forward: [
            function("qf_forward_64", forward_shared_bytes(64))?,
            function("qf_forward_128", forward_shared_bytes(128))?,
        ],
        backward: [
            function("qf_backward_64", backward_shared_bytes(64))?,
            function("qf_backward_128", backward_shared_bytes(128))?,
        ],
        delta: [function("qf_delta_64", 0)?, function("qf_delta_128", 0)?],
        ctx,
    })
}

fn cuda<R: CubeRuntime>(t: &CubeTensor<R>) -> Option<&Tensor> {
    (t as &dyn Any).downcast_ref::<Tensor>()
}

fn back<R: CubeRuntime>(t: Tensor) -> CubeTensor<R> {
    let t: Box<dyn Any> = Box::new(t);
    *t.downcast::<CubeTensor<R>>()
        .expect("the runtime was checked to be CUDA's")
}

/// Why a call that [`takes`] admits still runs the chunked attention: said once per reason on
/// stderr (the result is the same, the speed is not), and `None` for the caller to return.
fn fall_back<T>(reason: String) -> Option<T> {
    static SAID: OnceLock<Mutex<std::collections::HashSet<String>>> = OnceLock::new();
    let said = SAID.get_or_init(Default::default);
    if said
        .lock()
        .is_ok_and(|mut said| said.insert(reason.clone()))
    {
        eprintln!("qwen-model: the fused attention falls back to the chunked one: {reason}");
    }
    None
}

/// The `[batch, head, row]` strides of a `[batch, heads, len, d]` bf16 tensor whose rows are
/// contiguous and whose other strides keep 16-byte alignment; why not otherwise.
fn row_strides(t: &Tensor, what: &str) -> Result<[i64; 3], String> {
    let strides = t.meta.strides();
    let fits = t.dtype == DType::BF16
        && strides.len() == 4
        && strides[3] == 1
        && strides[..3].iter().all(|s| s % 8 == 0);
    match fits {
        true => Ok([0, 1, 2].map(|i| strides[i] as i64)),
        false => Err(format!(
            "{what} is {:?} with strides {:?}; the kernels read bf16 rows that are contiguous, the other strides multiples of 8",
            t.dtype,
            &strides[..]
        )),
    }
}

/// The `[batch, position]` strides of an i32 `[batch, len]` segment tensor; why not otherwise.
fn segment_strides(t: &Tensor) -> Result<[i64; 2], String> {
    let strides = t.meta.strides();
    match t.dtype == DType::I32 && strides.len() == 2 {
        true => Ok([strides[0] as i64, strides[1] as i64]),
        false => Err(format!(
            "segment ids of {:?}; the kernels read i32",
            t.dtype
        )),
    }
}

/// The checked sizes and strides shared by both passes.
struct Call {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    seq: usize,
    head_dim: usize,
    /// q, k, v, then the query and key segments.
    strides: [i64; 13],
    kernels: &'static Kernels,
}

impl Call {
    fn new(inputs: [&Tensor; 5]) -> Result<Self, String> {
        let [q, k, v, qseg, kseg] = inputs;
        let (qs, ks) = (q.meta.shape(), k.meta.shape());
        let (batch, heads, seq, head_dim) = (qs[0], qs[1], qs[2], qs[3]);
        let kv_heads = ks[1];
        let mut strides = [0; 13];
        for (i, (t, what)) in [(q, "q"), (k, "k"), (v, "v")].into_iter().enumerate() {
            strides[3 * i..3 * i + 3].copy_from_slice(&row_strides(t, what)?);
        }
        strides[9..11].copy_from_slice(&segment_strides(qseg)?);
        strides[11..13].copy_from_slice(&segment_strides(kseg)?);
        let kernels = kernels(q.device.index)
            .ok_or_else(|| "the kernels do not build on this device (said above)".to_string())?;
        Ok(Self {
            batch,
            heads,
            kv_heads,
            seq,
            head_dim,
            strides,
            kernels,
        })
    }

    fn scale(&self) -> f32 {
        // As the chunked path: computed in f64, rounded once.
        (self.head_dim as f64).powf(-0.5) as f32
    }

    /// Blocks along the sequence of `per_block` positions each.
    fn tiles(&self, per_block: usize) -> u32 {
        self.seq.div_ceil(per_block) as u32
    }
}

/// A contiguous tensor of `dims` on `like`'s device, uninitialised.
fn empty(like: &Tensor, dims: &[usize], dtype: DType) -> Tensor {
    empty_device_contiguous_dtype(
        like.client.clone(),
        like.device.clone(),
        Shape::from(dims.to_vec()),
        dtype,
    )
}

/// The inputs as CUDA tensors, if they are and [`takes`] admits their sizes and settings.
fn cuda_inputs<'a, R: CubeRuntime>(
    inputs: [&'a CubeTensor<R>; 5],
    params: &AttentionParams,
) -> Option<[&'a Tensor; 5]> {
    let [Some(q), Some(k), Some(v), Some(qseg), Some(kseg)] = inputs.map(cuda::<R>) else {
        return None;
    };
    takes(q.meta.shape(), k.meta.shape(), q.dtype, params).then_some([q, k, v, qseg, kseg])
}

fn launch<A: DeviceRepr>(
    kernels: &Kernels,
    stream: cudarc::driver::sys::CUstream,
    function: &CudaFunction,
    args: &A,
    (grid, threads): ((u32, u32, u32), u32),
    shared: usize,
) {
    // SAFETY: cubecl's stream of this context, alive as long as its server (the process); the
    // work is ordered by running inside `on_burn_stream`'s task.
    let stream = unsafe { kernels.ctx.wrap_borrowed_stream(stream) };
    let config = LaunchConfig {
        grid_dim: grid,
        block_dim: (threads, 1, 1),
        shared_mem_bytes: shared as u32,
    };
    // SAFETY: the arguments match the kernel's struct (see `DeviceRepr` above); every address
    // is a live burn buffer of the sizes the kernel reads and writes (checked by `Call::new`),
    // kept alive by `on_burn_stream` until the work has run.
    unsafe { stream.launch_builder(function).arg(args).launch(config) }
        .unwrap_or_else(|err| panic!("the fused attention's launch failed: {err}"));
}

/// The output `[batch, heads, seq, head_dim]` and the log-sum-exp `[batch, heads, seq]` (f32),
/// or `None` where the fused kernels do not take these inputs.
pub fn forward<R: CubeRuntime>(
    inputs: [&CubeTensor<R>; 5],
    params: &AttentionParams,
) -> Option<(CubeTensor<R>, CubeTensor<R>)> {
    let [q, k, v, qseg, kseg] = cuda_inputs(inputs, params)?;
    let call = match Call::new([q, k, v, qseg, kseg]) {
        Ok(call) => call,
        Err(reason) => return fall_back(reason),
    };
    let (b, h, s, d) = (call.batch, call.heads, call.seq, call.head_dim);
    // Written as [b, s, h, d], the layout the output projection reads: the model's swap back
    // to [b, s, h * d] is then free (a contiguous output took two copies a layer, ncu).
    let out = empty(q, &[b, s, h, d], DType::BF16);
    let lse = empty(q, &[b, h, s], DType::F32);
    let mut args = ForwardArgs {
        strides: call.strides,
        seq: s as i32,
        heads: h as i32,
        kv_heads: call.kv_heads as i32,
        scale_log2: call.scale() * std::f32::consts::LOG2_E,
        ..Default::default()
    };
    let grid = (call.tiles(forward_rows()), h as u32, b as u32);
    let kernels = call.kernels;
    qwen_gemm::on_burn_stream(q, &[q, k, v, qseg, kseg, &out, &lse], move |stream, a| {
        [
            args.q,
            args.k,
            args.v,
            args.query_segments,
            args.key_segments,
            args.out,
            args.lse,
        ] = [a[0], a[1], a[2], a[3], a[4], a[5], a[6]];
        let function = &kernels.forward[dim_index(d)];
        launch(
            kernels,
            stream,
            function,
            &args,
            (grid, forward_threads() as u32),
            forward_shared_bytes(d),
        );
    });
    // [b, h, s, d] as a view of it.
    let mut out = out;
    out.meta.swap(1, 2);
    Some((back(out), back(lse)))
}

/// `dQ`, `dK` and `dV`, in f32 (the kernels add them up atomically, so their last bits may
/// differ from run to run, as PyTorch's flash backward's do), or `None` where the fused kernels
/// do not take these inputs. `out` and `lse` are [`forward`]'s.
pub fn backward<R: CubeRuntime>(
    inputs: [&CubeTensor<R>; 5],
    out: &CubeTensor<R>,
    lse: &CubeTensor<R>,
    grad_out: &CubeTensor<R>,
    params: &AttentionParams,
) -> Option<[CubeTensor<R>; 3]> {
    let [q, k, v, qseg, kseg] = cuda_inputs(inputs, params)?;
    let (out, lse, grad_out) = (cuda(out)?, cuda(lse)?, cuda(grad_out)?);
    let lse_shape = lse.meta.shape();
    let contiguous_lse = lse_shape.num_dims() == 3
        && lse.meta.strides()[..] == [lse_shape[1] * lse_shape[2], lse_shape[2], 1];
    if lse.dtype != DType::F32 || !contiguous_lse {
        return fall_back(format!(
            "the log-sum-exp is {:?} {:?} with strides {:?}, not the forward's contiguous f32",
            lse.dtype,
            &lse_shape[..],
            &lse.meta.strides()[..]
        ));
    }
    if grad_out.meta.shape() != q.meta.shape() || out.meta.shape() != q.meta.shape() {
        return fall_back("the output or its gradient is not shaped like q".to_string());
    }
    let checked = Call::new([q, k, v, qseg, kseg]).and_then(|call| {
        let strides = (
            row_strides(out, "the output")?,
            row_strides(grad_out, "dO")?,
        );
        Ok((call, strides))
    });
    let (call, (out_strides, grad_strides)) = match checked {
        Ok(checked) => checked,
        Err(reason) => return fall_back(reason),
    };
    let (b, h, s, d) = (call.batch, call.heads, call.seq, call.head_dim);
    let delta = empty(q, &[b, h, s], DType::F32);
    let grad_q = empty(q, &[b, h, s, d], DType::F32);
    let grad_k = empty(q, &[b, call.kv_heads, s, d], DType::F32);
    let grad_v = empty(q, &[b, call.kv_heads, s, d], DType::F32);
    let rows = b * h * s;
    let mut delta_args = DeltaArgs {
        strides: [
            out_strides[0],
            out_strides[1],
            out_strides[2],
            grad_strides[0],
            grad_strides[1],
            grad_strides[2],
        ],
        seq: s as i32,
        heads: h as i32,
        rows: rows as i32,
        ..Default::default()
    };
    let mut strides = [0; 16];
    strides[..13].copy_from_slice(&call.strides);
    strides[13..].copy_from_slice(&grad_strides);
    let scale = call.scale();
    let mut args = BackwardArgs {
        strides,
        seq: s as i32,
        heads: h as i32,
        kv_heads: call.kv_heads as i32,
        scale_log2: scale * std::f32::consts::LOG2_E,
        scale,
        ..Default::default()
    };
    // A block per `backward_keys()` keys and query head.
    let grid = (call.tiles(backward_keys()), h as u32, b as u32);
    let kernels = call.kernels;
    let accumulators = [&grad_q, &grad_k, &grad_v].map(|t| t.meta.shape().num_elements() * 4);
    qwen_gemm::on_burn_stream(
        q,
        &[
            q, k, v, qseg, kseg, out, lse, grad_out, &delta, &grad_q, &grad_k, &grad_v,
        ],
        move |stream, a| {
            [delta_args.out, delta_args.grad_out, delta_args.delta] = [a[5], a[7], a[8]];
            [
                args.q,
                args.k,
                args.v,
                args.query_segments,
                args.key_segments,
                args.lse,
                args.grad_out,
                args.delta,
                args.grad_q,
                args.grad_k,
                args.grad_v,
            ] = [
                a[0], a[1], a[2], a[3], a[4], a[6], a[7], a[8], a[9], a[10], a[11],
            ];
            for (address, bytes) in [args.grad_q, args.grad_k, args.grad_v]
                .into_iter()
                .zip(accumulators)
            {
                // SAFETY: a live buffer of `bytes` bytes, zeroed on the stream that the kernels
                // below run on.
                unsafe { cudarc::driver::result::memset_d8_async(address, 0, bytes, stream) }
                    .unwrap_or_else(|err| panic!("the fused attention's memset failed: {err}"));
            }
            let i = dim_index(d);
            // `d / 8` threads per row.
            let blocks = rows.div_ceil(DELTA_THREADS as usize / (d / 8)) as u32;
            launch(
                kernels,
                stream,
                &kernels.delta[i],
                &delta_args,
                ((blocks, 1, 1), DELTA_THREADS),
                0,
            );
            launch(
                kernels,
                stream,
                &kernels.backward[i],
                &args,
                (grid, backward_threads() as u32),
                backward_shared_bytes(d),
            );
        },
    );
    Some([back(grad_q), back(grad_k), back(grad_v)])
}
