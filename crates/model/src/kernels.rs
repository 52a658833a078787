//! The switch between the crate's own CubeCL kernels and their tensor-op bodies.
//!
//! The kernels (the attention's block softmax, `attention::cube`, and the rotary embedding and
//! RMSNorm, `rowwise::cube`) are implementations for CubeCL backends behind the crate's backend
//! traits; every one of them has a tensor-op body that runs on any backend and is its
//! reference. One process-wide setting picks which runs, for all of them together.

use std::sync::atomic::{AtomicU8, AtomicU16, Ordering};

/// Which body runs where a CubeCL backend has a kernel of this crate.
///
/// The default is [`Auto`](Self::Auto): on the H200 the kernels made a 0.5b step 1.6 times as
/// fast as the tensor ops, and passed the fast-path check and the 50-step loss curve
/// (docs/BENCHMARKS.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KernelBody {
    /// The kernels on CUDA, tensor ops on other runtimes (wgpu keeps the reference path).
    #[default]
    Auto,
    /// The kernels on every CubeCL runtime (tests run them on wgpu this way).
    Kernel,
    /// Tensor ops everywhere.
    TensorOps,
}

impl KernelBody {
    /// Every body, in the order of their discriminants.
    pub const ALL: [KernelBody; 3] = [Self::Auto, Self::Kernel, Self::TensorOps];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Kernel => "kernel",
            Self::TensorOps => "tensor-ops",
        }
    }

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

impl std::str::FromStr for KernelBody {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        by_name(Self::ALL, Self::name, s)
            .ok_or_else(|| format!("unknown kernel body `{s}`; use auto, kernel or tensor-ops"))
    }
}

/// The item of `all` whose `name` is `s`.
fn by_name<T: Copy, const N: usize>(
    all: [T; N],
    name: fn(T) -> &'static str,
    s: &str,
) -> Option<T> {
    all.into_iter().find(|&item| name(item) == s)
}

static KERNEL_BODY: AtomicU8 = AtomicU8::new(KernelBody::Auto as u8);

/// Sets the body of the crate's kernels for the whole process. Set it before queueing work: a
/// lazy backend (burn's fusion) decides when it runs the queued operations, with the setting of
/// that moment.
pub fn set_kernel_body(body: KernelBody) {
    KERNEL_BODY.store(body as u8, Ordering::Relaxed);
}

/// The body set by [`set_kernel_body`], the default until then.
pub fn kernel_body() -> KernelBody {
    KernelBody::ALL[usize::from(KERNEL_BODY.load(Ordering::Relaxed))]
}

/// One of the crate's kernels, for turning it off alone ([`set_kernels_off`]): to find which
/// one a difference comes from, or to work around one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// The attention's block softmax, both directions.
    Softmax,
    /// The rotary embedding, both directions.
    Rotary,
    /// RMSNorm's forward and the gradient of its input.
    RmsNorm,
    /// The fused attention (CUDA only, `attention::flash`): both passes in tensor-core kernels
    /// that keep the scores on chip. Off, the chunked attention runs, with the block softmax
    /// kernel unless that is off too.
    Flash,
    /// The gradient of the token embedding: one kernel adding each row of the output gradient
    /// into its token's row (burn's `select_add` walks every token serially per column).
    Embedding,
    /// SwiGLU's backward: both gradients from one read of `gate`, `up` and the upstream
    /// gradient (burn's fuser splits the tensor ops into two kernels that read them twice).
    SwiGlu,
    /// The linear biases' and RMSNorm weights' gradients (sums over rows): one pass over the
    /// bf16 rows into per-part f32 sums, then a small sum of the parts (the tensor ops cast
    /// the rows to f32, or form the products in f32, and reduce that copy in two stages).
    ColumnSums,
    /// The trainer's AdamW step (CUDA only, `qwen_sft::fused_adamw`): the global norm and the
    /// update of many parameter tensors per launch, instead of gathering the gradients into
    /// flat buffers and running tensor ops over them. Listed here so that one switch (this
    /// enum, [`KernelBody`]) turns every kernel of the workspace on or off.
    Adamw,
    /// The AdamW kernels' bf16 copies of the parameters they step, for a model that computes
    /// in bf16 (`qwen_gemm::copies`): its casts of a parameter, forward and backward, take the
    /// copy instead of a cast kernel each. Off, every cast runs.
    Bf16Copies,
}

impl Kernel {
    pub const ALL: [Kernel; 9] = [
        Self::Softmax,
        Self::Rotary,
        Self::RmsNorm,
        Self::Flash,
        Self::Embedding,
        Self::SwiGlu,
        Self::ColumnSums,
        Self::Adamw,
        Self::Bf16Copies,
    ];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Softmax => "softmax",
            Self::Rotary => "rotary",
            Self::RmsNorm => "rms-norm",
            Self::Flash => "flash",
            Self::Embedding => "embedding",
            Self::SwiGlu => "swiglu",
            Self::ColumnSums => "column-sums",
            Self::Adamw => "adamw",
            Self::Bf16Copies => "bf16-copies",
        }
    }

    /// One bit of the `u16` mask of kernels turned off (sixteen kernels at most).
    fn bit(self) -> u16 {
        1 << self as u16
    }
}

impl std::str::FromStr for Kernel {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        by_name(Self::ALL, Self::name, s).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|k| k.name()).collect();
            format!("unknown kernel `{s}`; use one of {}", names.join(", "))
        })
    }
}

static KERNELS_OFF: AtomicU16 = AtomicU16::new(0);

/// Keeps `kernels` on their tensor-op bodies whatever [`KernelBody`] is set (none by default),
/// for the whole process; read, like the body, when a lazy backend runs its queue.
pub fn set_kernels_off(kernels: &[Kernel]) {
    let mask = kernels.iter().fold(0, |mask, kernel| mask | kernel.bit());
    KERNELS_OFF.store(mask, Ordering::Relaxed);
}

/// The kernels turned off by [`set_kernels_off`].
pub fn kernels_off() -> Vec<Kernel> {
    let mask = KERNELS_OFF.load(Ordering::Relaxed);
    Kernel::ALL
        .into_iter()
        .filter(|kernel| mask & kernel.bit() != 0)
        .collect()
}

/// Whether `kernel` runs on a CubeCL runtime (`on_cuda`: whether it is CUDA's) under the body
/// and the kernels turned off now.
pub fn kernel_runs(kernel: Kernel, on_cuda: bool) -> bool {
    kernel_body().runs_kernels(on_cuda) && KERNELS_OFF.load(Ordering::Relaxed) & kernel.bit() == 0
}

#[cfg(test)]
mod tests {
    use super::{Kernel, KernelBody};

    #[test]
    fn kernels_turn_off_one_at_a_time() {
        for kernel in Kernel::ALL {
            assert_eq!(kernel.name().parse::<Kernel>(), Ok(kernel));
        }
        assert!(
            "rmsnorm"
                .parse::<Kernel>()
                .unwrap_err()
                .contains("rms-norm")
        );
        // The switches are process-wide: this test alone sets them.
        super::set_kernels_off(&[Kernel::Rotary]);
        assert_eq!(super::kernels_off(), vec![Kernel::Rotary]);
        assert!(!super::kernel_runs(Kernel::Rotary, true));
        assert!(super::kernel_runs(Kernel::Softmax, true));
        assert!(
            !super::kernel_runs(Kernel::Softmax, false),
            "auto: CUDA only"
        );
        super::set_kernels_off(&[]);
        assert!(super::kernel_runs(Kernel::Rotary, true));
    }

    #[test]
    fn kernel_bodies_parse_by_name() {
        for body in KernelBody::ALL {
            assert_eq!(body.name().parse::<KernelBody>(), Ok(body));
        }
        let err = "fused".parse::<KernelBody>().unwrap_err();
        assert!(
            err.contains("`fused`") && err.contains("tensor-ops"),
            "{err}"
        );
        assert_eq!(KernelBody::default(), KernelBody::Auto);
        assert_eq!(super::kernel_body(), KernelBody::Auto);
        assert!(KernelBody::Auto.runs_kernels(true) && !KernelBody::Auto.runs_kernels(false));
        assert!(KernelBody::Kernel.runs_kernels(false));
        assert!(!KernelBody::TensorOps.runs_kernels(true));
    }
}
