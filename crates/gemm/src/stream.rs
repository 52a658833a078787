//! Work of our own on burn's CUDA stream, in order with burn's kernels and without a host wait.
//!
//! cubecl-cuda launches its kernels from a device thread that takes tasks in order, on a CUDA
//! stream it keeps private. The patched cubecl-cuda (`vendor/README.md`) adds
//! `CudaServer::stream_for_external_work`, which joins the streams of some buffers to the
//! current one, as a kernel launch would, and hands out the raw stream and the buffers'
//! addresses. [`on_burn_stream`] queues a task on that thread which does so and then runs the
//! caller's work on the stream: cuBLASLt products here, the model crate's fused attention there.

use burn_cubecl::cubecl::Runtime;
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::tensor::CubeTensor;
use cubecl_common::device::Device;
use cubecl_common::device_handle::DeviceHandle;
use cubecl_common::stream_id::StreamId;
use cudarc::driver::sys::CUstream;

type CudaServer = <CudaRuntime as Runtime>::Server;

/// Queues `work` on the device thread of `on`'s device; it runs there with burn's CUDA stream
/// of the calling thread and the device addresses of `buffers` (in their order), after every
/// kernel burn queued before this call and before every kernel queued after it.
///
/// `work` must only put asynchronous work on that stream (no host wait, no other stream) and
/// must not fail: the buffers it writes are already promised to later kernels, so it panics
/// on the device thread instead. The buffers stay alive as long as the work needs them: cubecl
/// hands freed memory only to work queued later on the same stream.
pub fn on_burn_stream<F>(
    on: &CubeTensor<CudaRuntime>,
    buffers: &[&CubeTensor<CudaRuntime>],
    work: F,
) where
    F: FnOnce(CUstream, &[u64]) + Send + 'static,
{
    let bindings = buffers
        .iter()
        .map(|t| t.handle.clone().binding())
        .collect::<Vec<_>>();
    let stream_id = StreamId::current();
    DeviceHandle::<CudaServer>::new(on.device.to_id()).submit(move |server: &mut CudaServer| {
        let (stream, addresses) = server
            .stream_for_external_work(stream_id, bindings)
            .unwrap_or_else(|err| panic!("burn's CUDA stream for external work: {err:?}"));
        work(stream, &addresses);
    });
}
