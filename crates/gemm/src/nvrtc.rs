//! CUDA C of the workspace's own (the fused attention's, the AdamW step's), compiled at run time
//! by NVRTC for the device's compute capability, once per device and process.

// The context's event tracking is switched off through cudarc's unsafe call.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::error::Error;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaContext, CudaModule};
use cudarc::nvrtc::{CompileOptions, compile_ptx_with_opts};

/// What [`compile`] gives: the device's context, the loaded module, and the compute capability
/// it was compiled for.
pub struct Compiled {
    pub ctx: Arc<CudaContext>,
    pub module: Arc<CudaModule>,
    pub capability: (i32, i32),
}

/// `source` compiled for CUDA device `index` and loaded there. Work on the module's functions is
/// ordered by burn's stream ([`crate::on_burn_stream`]), so the context's per-buffer events are
/// switched off: they would only cost.
pub fn compile(index: usize, source: &str) -> Result<Compiled, Box<dyn Error>> {
    let ctx = CudaContext::new(index)?;
    // SAFETY: nothing has recorded events on this handle of the context yet.
    unsafe { ctx.disable_event_tracking() };
    let (major, minor) = ctx.compute_capability()?;
    let options = CompileOptions {
        options: vec![format!("--gpu-architecture=compute_{major}{minor}")],
        ..Default::default()
    };
    let module = ctx.load_module(compile_ptx_with_opts(source, options)?)?;
    Ok(Compiled {
        ctx,
        module,
        capability: (major, minor),
    })
}

/// A cache of one value per CUDA device for [`once_per_device`]: a `static` of each caller's.
pub type PerDevice<T> = OnceLock<Mutex<HashMap<usize, Option<&'static T>>>>;

/// The value `build` makes for CUDA device `index`, made on its first use and kept for the
/// process; `None` where it fails, which stderr says once: `"{what} does not build on CUDA
/// device {index} ({error}); {instead}"`.
pub fn once_per_device<T: Sync + 'static>(
    cache: &PerDevice<T>,
    index: usize,
    what: &str,
    instead: &str,
    build: impl FnOnce() -> Result<T, Box<dyn Error>>,
) -> Option<&'static T> {
    let mut built = cache.get_or_init(Default::default).lock().ok()?;
    *built.entry(index).or_insert_with(|| match build() {
        Ok(value) => Some(Box::leak(Box::new(value))),
        Err(err) => {
            eprintln!("{what} does not build on CUDA device {index} ({err}); {instead}");
            None
        }
    })
}
