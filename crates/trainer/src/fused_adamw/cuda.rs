//! The kernels of `adamw.cu` on burn's CUDA stream: CUDA C compiled at run time by NVRTC once
//! per device and process, launched through [`qwen_gemm::on_burn_stream`] in order with burn's
//! kernels and without a host wait.

// Raw device pointers and kernel launches through cudarc.
#![allow(unsafe_code)]

use std::any::Any;
use std::sync::Arc;

use burn::tensor::{DType, Shape};
use burn_cubecl::CubeRuntime;
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use cudarc::driver::{CudaContext, CudaFunction, DeviceRepr, LaunchConfig, PushKernelArg};
use qwen_gemm::nvrtc::{Compiled, PerDevice, compile, once_per_device};

use super::AdamwStep;
use super::plan::{CHUNK, MAX_TENSORS, launches};

type Tensor = CubeTensor<CudaRuntime>;

const SOURCE: &str = include_str!("adamw.cu");
/// `QO_THREADS`.
const THREADS: u32 = 256;

/// `QoNormArgs` in `adamw.cu`.
#[repr(C)]
#[derive(Clone, Copy)]
struct NormArgs {
    grads: [u64; MAX_TENSORS],
    numel: [i64; MAX_TENSORS],
    partials: u64,
    first_block: [i32; MAX_TENSORS + 1],
    tensors: i32,
    block_offset: i32,
    pad: i32,
}

/// `QoFinishArgs`.
#[repr(C)]
#[derive(Clone, Copy)]
struct FinishArgs {
    partials: u64,
    norm: u64,
    count: i32,
    pad: i32,
}

/// `QoStepArgs`.
#[repr(C)]
#[derive(Clone, Copy)]
struct StepArgs {
    param: [u64; MAX_TENSORS],
    grad: [u64; MAX_TENSORS],
    out: [u64; MAX_TENSORS],
    copy: [u64; MAX_TENSORS],
    moment_offset: [i64; MAX_TENSORS],
    numel: [i64; MAX_TENSORS],
    first: u64,
    second: u64,
    first_out: u64,
    second_out: u64,
    norm: u64,
    first_block: [i32; MAX_TENSORS + 1],
    tensors: i32,
    decays: u64,
    beta1: f32,
    beta2: f32,
    one_minus_beta1: f32,
    one_minus_beta2: f32,
    eps: f32,
    step_size: f32,
    bias2_sqrt: f32,
    decay_factor: f32,
    max_norm: f32,
    pad: i32,
}

// The structs have no padding: 8-byte fields first, the i32 arrays after them sized so that
// the next 8-byte field (StepArgs::decays) falls on a multiple of 8, and an explicit `pad`.
const _: () = assert!(size_of::<NormArgs>() == 1304 && size_of::<StepArgs>() == 3424);
const _: () = assert!(size_of::<FinishArgs>() == 24);

// SAFETY: plain `#[repr(C)]` data laid out as the kernels' argument structs, without padding.
unsafe impl DeviceRepr for NormArgs {}
// SAFETY: as above.
unsafe impl DeviceRepr for FinishArgs {}
// SAFETY: as above.
unsafe impl DeviceRepr for StepArgs {}

struct Kernels {
    ctx: Arc<CudaContext>,
    partials: CudaFunction,
    finish: CudaFunction,
    step: CudaFunction,
}

/// The kernels of CUDA device `index`, built on first use; `None` where they do not build
/// there (said once on stderr; the tensor ops run instead).
fn kernels(index: usize) -> Option<&'static Kernels> {
    static BUILT: PerDevice<Kernels> = PerDevice::new();
    once_per_device(
        &BUILT,
        index,
        "qwen-sft: the AdamW kernels",
        "tensor ops run",
        || {
            let Compiled { ctx, module, .. } = compile(index, SOURCE)?;
            Ok(Kernels {
                partials: module.load_function("qo_norm_partials")?,
                finish: module.load_function("qo_norm_finish")?,
                step: module.load_function("qo_adamw_step")?,
                ctx,
            })
        },
    )
}

fn cuda<R: CubeRuntime>(t: CubeTensor<R>) -> Option<Tensor> {
    let t: Box<dyn Any> = Box::new(t);
    t.downcast::<Tensor>().ok().map(|t| *t)
}

fn back<R: CubeRuntime>(t: Tensor) -> CubeTensor<R> {
    let t: Box<dyn Any> = Box::new(t);
    *t.downcast::<CubeTensor<R>>()
        .expect("the runtime was checked to be CUDA's")
}

/// `t` as a CUDA tensor the kernels read: f32, one dimension, stride 1 (copied if it is a
/// strided view); `None` otherwise.
fn flat_f32<R: CubeRuntime>(t: CubeTensor<R>) -> Option<Tensor> {
    let t = burn_cubecl::kernel::into_contiguous(cuda(t)?);
    let fits =
        t.dtype == DType::F32 && t.meta.shape().num_dims() == 1 && t.meta.strides()[..] == [1];
    fits.then_some(t)
}

fn empty(like: &Tensor, len: usize) -> Tensor {
    empty_of(like, len, DType::F32)
}

fn empty_of(like: &Tensor, len: usize, dtype: DType) -> Tensor {
    empty_device_contiguous_dtype(
        like.client.clone(),
        like.device.clone(),
        Shape::from(vec![len]),
        dtype,
    )
}

fn numel(t: &Tensor) -> usize {
    t.meta.shape().num_elements()
}

fn launch<A: DeviceRepr>(
    kernels: &Kernels,
    stream: cudarc::driver::sys::CUstream,
    function: &CudaFunction,
    args: &A,
    blocks: usize,
) {
    // SAFETY: cubecl's stream of this context, alive as long as its server (the process); the
    // work is ordered by running inside `on_burn_stream`'s task.
    let stream = unsafe { kernels.ctx.wrap_borrowed_stream(stream) };
    let config = LaunchConfig {
        grid_dim: (u32::try_from(blocks).expect("under 2^32 blocks"), 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the arguments match the kernel's struct (see `DeviceRepr` above); every address
    // is a live f32 buffer of the sizes given (checked by `flat_f32` and the callers), kept
    // alive by `on_burn_stream` until the work has run.
    unsafe { stream.launch_builder(function).arg(args).launch(config) }
        .unwrap_or_else(|err| panic!("the AdamW kernel's launch failed: {err}"));
}

/// `tensors` as CUDA's f32 vectors with the kernels of their device, or `None` (another
/// runtime, another layout, kernels that do not build).
fn prepare<R: CubeRuntime>(tensors: &[&CubeTensor<R>]) -> Option<(Vec<Tensor>, &'static Kernels)> {
    let tensors = tensors
        .iter()
        .map(|&t| flat_f32(t.clone()))
        .collect::<Option<Vec<_>>>()?;
    let kernels = kernels(tensors.first()?.device.index)?;
    Some((tensors, kernels))
}

/// [`super::OptimizerBackend::grad_norm`] in kernels, or `None` where they do not run.
pub fn grad_norm<R: CubeRuntime>(grads: &[CubeTensor<R>]) -> Option<CubeTensor<R>> {
    let (grads, kernels) = prepare(&grads.iter().collect::<Vec<_>>())?;
    let numels: Vec<usize> = grads.iter().map(numel).collect();
    let plan = launches(&numels, MAX_TENSORS, CHUNK);
    let count = plan.last().map_or(0, |l| l.block_offset + l.blocks());
    let partials = empty(&grads[0], count.max(1));
    let norm = empty(&grads[0], 1);
    let mut buffers: Vec<&Tensor> = grads.iter().collect();
    buffers.extend([&partials, &norm]);
    qwen_gemm::on_burn_stream(&grads[0], &buffers, move |stream, addresses| {
        let (grads, rest) = addresses.split_at(numels.len());
        let (partials, norm) = (rest[0], rest[1]);
        for launch_plan in &plan {
            let tensors = launch_plan.tensors.clone();
            let mut args = NormArgs {
                grads: [0; MAX_TENSORS],
                numel: [0; MAX_TENSORS],
                partials,
                first_block: [0; MAX_TENSORS + 1],
                tensors: tensors.len() as i32,
                block_offset: launch_plan.block_offset as i32,
                pad: 0,
            };
            for (i, t) in tensors.enumerate() {
                args.grads[i] = grads[t];
                args.numel[i] = numels[t] as i64;
            }
            args.first_block[..launch_plan.first_block.len()]
                .copy_from_slice(&launch_plan.first_block);
            launch(
                kernels,
                stream,
                &kernels.partials,
                &args,
                launch_plan.blocks(),
            );
        }
        if count == 0 {
            // SAFETY: the live one-value buffer `norm`, on the stream the step runs on.
            unsafe { cudarc::driver::result::memset_d8_async(norm, 0, 4, stream) }
                .unwrap_or_else(|err| panic!("the AdamW norm's memset failed: {err}"));
            return;
        }
        let args = FinishArgs {
            partials,
            norm,
            count: count as i32,
            pad: 0,
        };
        launch(kernels, stream, &kernels.finish, &args, 1);
    });
    Some(back(norm))
}

/// A group's new values, moments `[first, second]` and the new values' bf16 copies (empty
/// unless asked for).
type Stepped<R> = (Vec<CubeTensor<R>>, [CubeTensor<R>; 2], Vec<CubeTensor<R>>);

/// The new values and moments of [`super::OptimizerBackend::adamw_group`] in kernels, from
/// the group's `values`, `grads`, `decays` and moments `[first, second]`, with the new values'
/// bf16 copies where `step.bf16_copies` asks for them, or `None` where the kernels do not run
/// (the caller then runs the tensor ops on the same inputs).
pub fn adamw_group<R: CubeRuntime>(
    values: &[CubeTensor<R>],
    grads: &[CubeTensor<R>],
    decays: &[bool],
    moments: [&CubeTensor<R>; 2],
    norm: &CubeTensor<R>,
    step: AdamwStep,
) -> Option<Stepped<R>> {
    let n = values.len();
    assert!(
        grads.len() == n && decays.len() == n && n > 0,
        "AdamW's group: {n} values, {} gradients, {} decay flags",
        grads.len(),
        decays.len()
    );
    let inputs: Vec<&CubeTensor<R>> = values
        .iter()
        .chain(grads)
        .chain(moments)
        .chain([norm])
        .collect();
    let (inputs, kernels) = prepare(&inputs)?;
    let numels: Vec<usize> = inputs[..n].iter().map(numel).collect();
    let total: usize = numels.iter().sum();
    let shapes_agree = numels
        .iter()
        .zip(&inputs[n..2 * n])
        .all(|(&v, g)| numel(g) == v)
        && numel(&inputs[2 * n]) == total
        && numel(&inputs[2 * n + 1]) == total
        && numel(&inputs[2 * n + 2]) == 1;
    assert!(
        shapes_agree,
        "AdamW's group: values, gradients and moments differ in size"
    );
    let like = &inputs[0];
    let outputs: Vec<Tensor> = numels.iter().map(|&len| empty(like, len)).collect();
    let moments_out = [empty(like, total), empty(like, total)];
    let copies: Vec<Tensor> = match step.bf16_copies {
        true => numels
            .iter()
            .map(|&len| empty_of(like, len, DType::BF16))
            .collect(),
        false => Vec::new(),
    };
    let mut buffers: Vec<&Tensor> = inputs.iter().chain(&outputs).collect();
    buffers.extend(&moments_out);
    buffers.extend(&copies);
    let plan = launches(&numels, MAX_TENSORS, CHUNK);
    let mut offsets = Vec::with_capacity(n);
    offsets.extend(numels.iter().scan(0, |offset, &len| {
        let start = *offset;
        *offset += len;
        Some(start as i64)
    }));
    let decays = decays.to_vec();
    qwen_gemm::on_burn_stream(like, &buffers, move |stream, a| {
        // values, grads, [first, second, norm], outputs, [first out, second out], copies
        let (values, a) = a.split_at(n);
        let (grads, a) = a.split_at(n);
        let (&[first, second, norm], a) = a.split_at(3) else {
            unreachable!("three buffers")
        };
        let (outputs, a) = a.split_at(n);
        let (&[first_out, second_out], copies) = a.split_at(2) else {
            unreachable!("two buffers")
        };
        for launch_plan in &plan {
            let tensors = launch_plan.tensors.clone();
            let mut args = StepArgs {
                param: [0; MAX_TENSORS],
                grad: [0; MAX_TENSORS],
                out: [0; MAX_TENSORS],
                copy: [0; MAX_TENSORS],
                moment_offset: [0; MAX_TENSORS],
                numel: [0; MAX_TENSORS],
                first,
                second,
                first_out,
                second_out,
                norm,
                first_block: [0; MAX_TENSORS + 1],
                tensors: tensors.len() as i32,
                decays: 0,
                beta1: step.beta1 as f32,
                beta2: step.beta2 as f32,
                one_minus_beta1: (1.0 - step.beta1) as f32,
                one_minus_beta2: (1.0 - step.beta2) as f32,
                eps: step.eps as f32,
                step_size: step.step_size() as f32,
                bias2_sqrt: step.bias2_sqrt() as f32,
                decay_factor: step.decay_factor() as f32,
                max_norm: step.max_grad_norm as f32,
                pad: 0,
            };
            for (i, t) in tensors.enumerate() {
                args.param[i] = values[t];
                args.grad[i] = grads[t];
                args.out[i] = outputs[t];
                args.copy[i] = copies.get(t).copied().unwrap_or(0);
                args.moment_offset[i] = offsets[t];
                args.numel[i] = numels[t] as i64;
                args.decays |= u64::from(decays[t]) << i;
            }
            args.first_block[..launch_plan.first_block.len()]
                .copy_from_slice(&launch_plan.first_block);
            launch(kernels, stream, &kernels.step, &args, launch_plan.blocks());
        }
    });
    let [first, second] = moments_out;
    Some((
        outputs.into_iter().map(back).collect(),
        [back(first), back(second)],
        copies.into_iter().map(back).collect(),
    ))
}
