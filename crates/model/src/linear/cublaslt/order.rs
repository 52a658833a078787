//! Ordering a product on our CUDA stream with the work on cubecl's stream.
//!
//! cubecl-cuda 0.10 runs its kernels on a non-blocking stream that it keeps private, so CUDA
//! events cannot join the two streams. Two ways are built here (docs/ARCHITECTURE.md, "GPU
//! speed", says why and what they cost):
//!
//! - [`Ordering::HostSync`]: wait on the host for cubecl's stream before the product and for
//!   ours after it. Simple; tens of microseconds a product, and the GPU idles meanwhile.
//! - [`Ordering::Flags`]: the GPU orders itself through two 32-bit counters in device memory.
//!   A one-thread cubecl kernel writes `n` to the first once cubecl's earlier work is done,
//!   our stream waits for it (`cuStreamWaitValue32`), runs the product and then writes `n` to
//!   the second (`cuStreamWriteValue32`), and a one-thread cubecl kernel spins until it sees
//!   `n` there, holding back cubecl's later work. The host never waits. Where the driver
//!   refuses the stream memory operations (the H200's did, with `CUDA_ERROR_INVALID_VALUE`),
//!   our stream waits and writes with one-thread kernels of its own instead.
//!
//! With `Flags`, every buffer the product touches stays ordered: cubecl reuses freed memory
//! only for work queued after the spinning kernel, which ends after the product.

use burn_cubecl::cubecl;
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::cubecl::server::Handle;
use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaStream, DriverError, LaunchConfig, PushKernelArg, sys};

/// How [`super::gemm`] orders its product with cubecl's stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ordering {
    HostSync,
    Flags,
}

/// The word cubecl's stream writes when its earlier work is done.
const READY: usize = 0;
/// The word our stream writes when the product is done, on its own 128-byte line.
const DONE: usize = 32;
const WORDS: usize = 64;

#[cube(launch)]
fn signal_ready(flags: &mut Array<u32>, value: u32) {
    flags[READY] = value;
}

#[cube(launch)]
fn wait_done(flags: &Array<Atomic<u32>>, value: u32) {
    // An atomic read (compiled to an atomic add of zero) so that every pass reloads the word.
    loop {
        if flags[DONE].load() >= value {
            break;
        }
    }
}

/// How our stream waits for and writes a counter: stream memory operations where the driver
/// takes them, else one-thread kernels of our own (compiled once with NVRTC).
enum OurSide {
    MemoryOps,
    Kernels { wait: CudaFunction, store: CudaFunction },
}

/// Our stream's two kernels, for a driver that refuses stream memory operations on cubecl's
/// (stream-ordered pool) memory.
const KERNELS: &str = r#"
extern "C" __global__ void qwen_wait_geq(unsigned int* word, unsigned int value) {
    while (atomicAdd(word, 0u) < value) { }
}
extern "C" __global__ void qwen_store(unsigned int* word, unsigned int value) {
    __threadfence();
    atomicExch(word, value);
}
"#;

impl OurSide {
    fn kernels(stream: &Arc<CudaStream>) -> Result<Self, Box<dyn std::error::Error>> {
        let ptx = cudarc::nvrtc::compile_ptx(KERNELS)?;
        let module = stream.context().load_module(ptx)?;
        Ok(Self::Kernels {
            wait: module.load_function("qwen_wait_geq")?,
            store: module.load_function("qwen_store")?,
        })
    }
}

fn refused(err: DriverError) {
    eprintln!(
        "qwen-model: the driver refused a stream memory operation ({err:?}); cuBLASLt's stream \
         waits and signals with one-thread kernels instead"
    );
}

/// Launches a one-thread `kernel(word, value)` on `stream`.
fn launch_one(
    stream: &Arc<CudaStream>,
    kernel: &CudaFunction,
    word: u64,
    value: u32,
) -> Result<(), DriverError> {
    let config = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (1, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: both kernels take (unsigned int*, unsigned int), and `word` is a live device word
    // of this context.
    unsafe {
        stream
            .launch_builder(kernel)
            .arg(&word)
            .arg(&value)
            .launch(config)?;
    }
    Ok(())
}

/// The two counters of one device, and how many products they have ordered.
pub(super) struct Flags {
    handle: Handle,
    address: u64,
    count: u32,
    ours: OurSide,
    /// Keeps cubecl from handing the buffer to anything else.
    _resource: Box<dyn std::any::Any + Send>,
}

type Error = Box<dyn std::error::Error>;

impl Flags {
    pub(super) fn new(client: &ComputeClient<CudaRuntime>) -> Option<Self> {
        let handle = client.create_from_slice(u32::as_bytes(&[0u32; WORDS]));
        let resource = client.get_resource(handle.clone()).ok()?;
        let address = resource.resource().ptr;
        Some(Self {
            handle,
            address,
            count: 0,
            ours: OurSide::MemoryOps,
            _resource: Box::new(resource),
        })
    }

    /// Queues, on cubecl's stream, the signal that our stream's next product waits for, and
    /// makes `stream` wait for it. Returns the product's number, for [`Self::after`].
    pub(super) fn before(
        &mut self,
        client: &ComputeClient<CudaRuntime>,
        stream: &Arc<CudaStream>,
    ) -> Result<u32, Error> {
        // Wrapping would need four billion products in one process.
        self.count += 1;
        let n = self.count;
        // SAFETY: the buffer holds WORDS u32s, and READY is inside it.
        let flags = unsafe { ArrayArg::from_raw_parts(self.handle.clone(), WORDS) };
        signal_ready::launch::<CudaRuntime>(
            client,
            CubeCount::Static(1, 1, 1),
            CubeDim::new_1d(1),
            flags,
            n,
        );
        let ready = self.address + (READY * 4) as u64;
        if matches!(self.ours, OurSide::MemoryOps) {
            let flag = sys::CUstreamWaitValue_flags::CU_STREAM_WAIT_VALUE_GEQ as u32;
            stream.context().bind_to_thread()?;
            // SAFETY: `ready` is a live device word of this context (the buffer is kept by self).
            let waited = unsafe { sys::cuStreamWaitValue32_v2(stream.cu_stream(), ready, n, flag) };
            match waited.result() {
                Ok(()) => return Ok(n),
                Err(err) => {
                    refused(err);
                    self.ours = OurSide::kernels(stream)?;
                }
            }
        }
        let OurSide::Kernels { wait, .. } = &self.ours else {
            unreachable!("set above")
        };
        launch_one(stream, wait, ready, n)?;
        Ok(n)
    }

    /// Marks product `n` done on `stream`, and holds cubecl's stream until it is.
    pub(super) fn after(
        &mut self,
        client: &ComputeClient<CudaRuntime>,
        stream: &Arc<CudaStream>,
        n: u32,
    ) -> Result<(), Error> {
        let done = self.address + (DONE * 4) as u64;
        if matches!(self.ours, OurSide::MemoryOps) {
            // The default flags include a memory barrier: the product's writes come first.
            let flag = sys::CUstreamWriteValue_flags::CU_STREAM_WRITE_VALUE_DEFAULT as u32;
            // SAFETY: as in `before`.
            let written = unsafe { sys::cuStreamWriteValue32_v2(stream.cu_stream(), done, n, flag) };
            if let Err(err) = written.result() {
                refused(err);
                self.ours = OurSide::kernels(stream)?;
            }
        }
        if let OurSide::Kernels { store, .. } = &self.ours {
            launch_one(stream, store, done, n)?;
        }
        // SAFETY: the buffer holds WORDS u32s, and DONE is inside it.
        let flags = unsafe { ArrayArg::from_raw_parts(self.handle.clone(), WORDS) };
        wait_done::launch::<CudaRuntime>(
            client,
            CubeCount::Static(1, 1, 1),
            CubeDim::new_1d(1),
            flags,
            n,
        );
        Ok(())
    }
}
