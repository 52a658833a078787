//! cuBLASLt's per-shape setup, made once and reused (`GemmBody::CublasltCached`).
//!
//! cudarc's `Matmul::matmul` creates three matrix layouts, a matmul descriptor and a
//! preference, asks cuBLASLt's heuristic for an algorithm and destroys them all again on every
//! call. None of them holds a buffer address, so for a given shape, layout and dtype they can be
//! kept: a [`Plans`] map holds one [`Plan`] per [`PlanKey`], and a product then costs one
//! `cublasLtMatmul` call. The descriptors are made exactly as cudarc makes them (same types,
//! compute types, transposes and batch attributes, no epilogue), so both paths run the same
//! algorithm on the same data.

#![allow(unsafe_code)]

use std::collections::HashMap;
use std::ffi::{c_int, c_void};
use std::mem::size_of;

use burn::tensor::DType;
use cudarc::cublaslt::{MatmulConfig, result, sys};

/// What decides a plan: everything in a product's config but the buffers, and the dtypes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct PlanKey {
    dtype: u8,
    /// Whether C is f32 where A and B are half precision (a mixed product).
    f32_out: bool,
    transpose: [bool; 2],
    /// cuBLASLt's `m`, `n`, `k`.
    dims: [u64; 3],
    /// `lda`, `ldb`, `ldc`.
    leading: [i64; 3],
    /// The batch count and the three batch strides of a batched product.
    batch: Option<(i32, [i64; 3])>,
}

impl PlanKey {
    pub(super) fn new(config: &MatmulConfig, dtype: DType, out: DType) -> Self {
        let batch = match (
            config.batch_size,
            config.stride_a,
            config.stride_b,
            config.stride_c,
        ) {
            (Some(count), Some(a), Some(b), Some(c)) => Some((count, [a, b, c])),
            _ => None,
        };
        Self {
            dtype: match dtype {
                DType::BF16 => 0,
                DType::F16 => 1,
                _ => 2,
            },
            f32_out: out == DType::F32 && matches!(dtype, DType::BF16 | DType::F16),
            transpose: [config.transa, config.transb],
            dims: [config.m, config.n, config.k],
            leading: [config.lda, config.ldb, config.ldc],
            batch,
        }
    }

    /// C's element type: A's and B's, or f32 for a mixed product.
    fn out_type(&self) -> sys::cudaDataType {
        match self.f32_out {
            true => sys::cudaDataType_t::CUDA_R_32F,
            false => self.types().0,
        }
    }

    /// A's and B's element type and the compute type, as cudarc picks them.
    fn types(&self) -> (sys::cudaDataType, sys::cublasComputeType_t) {
        use sys::cublasComputeType_t::{CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F_FAST_TF32};
        use sys::cudaDataType_t::{CUDA_R_16BF, CUDA_R_16F, CUDA_R_32F};
        match self.dtype {
            0 => (CUDA_R_16BF, CUBLAS_COMPUTE_32F),
            1 => (CUDA_R_16F, CUBLAS_COMPUTE_32F),
            // f32 on TF32 tensor cores, as cudarc and burn's own CUDA matmul.
            _ => (CUDA_R_32F, CUBLAS_COMPUTE_32F_FAST_TF32),
        }
    }
}

/// One shape's descriptors and algorithm. Null handles (a plan whose making failed half-way)
/// are skipped on drop.
pub(super) struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    /// A, B and C (also D: the product is written over C).
    layouts: [sys::cublasLtMatrixLayout_t; 3],
    algo: Option<sys::cublasLtMatmulAlgo_t>,
}

// SAFETY: the handles are host-side cuBLASLt objects with no thread affinity; a plan is only
// used by whoever holds the lock of the map that owns it.
unsafe impl Send for Plan {}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each non-null handle was created by cuBLASLt for this plan and is destroyed
        // once; failures on teardown are ignored (nothing could be done about them).
        unsafe {
            if !self.desc.is_null() {
                let _ = result::destroy_matmul_desc(self.desc);
            }
            for layout in self.layouts {
                if !layout.is_null() {
                    let _ = result::destroy_matrix_layout(layout);
                }
            }
        }
    }
}

/// A matmul preference, destroyed when dropped.
struct Preference(sys::cublasLtMatmulPreference_t);

impl Drop for Preference {
    fn drop(&mut self) {
        // SAFETY: created by `create_matmul_pref` and destroyed once.
        unsafe {
            let _ = result::destroy_matmul_pref(self.0);
        }
    }
}

type Error = Box<dyn std::error::Error>;

/// A layout of `rows x cols` (column-major) with leading dimension `ld`, batched where the
/// product is.
fn layout(
    plan_layout: &mut sys::cublasLtMatrixLayout_t,
    matrix_type: sys::cudaDataType,
    [rows, cols]: [u64; 2],
    ld: i64,
    batch: Option<(i32, i64)>,
) -> Result<(), Error> {
    *plan_layout = result::create_matrix_layout(matrix_type, rows, cols, ld)?;
    if let Some((count, stride)) = batch {
        use sys::cublasLtMatrixLayoutAttribute_t::{
            CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
        };
        let count = count as c_int;
        // SAFETY: the layout is live; each value is the type the attribute takes.
        unsafe {
            result::set_matrix_layout_attribute(
                *plan_layout,
                CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                (&count as *const c_int).cast(),
                size_of::<c_int>(),
            )?;
            result::set_matrix_layout_attribute(
                *plan_layout,
                CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                (&stride as *const i64).cast(),
                size_of::<i64>(),
            )?;
        }
    }
    Ok(())
}

impl Plan {
    /// Makes the descriptors of `key` and asks cuBLASLt's heuristic for its best algorithm
    /// within `workspace_bytes`.
    fn new(
        handle: sys::cublasLtHandle_t,
        key: &PlanKey,
        workspace_bytes: usize,
    ) -> Result<Self, Error> {
        use sys::cublasLtMatmulDescAttributes_t::{
            CUBLASLT_MATMUL_DESC_TRANSA, CUBLASLT_MATMUL_DESC_TRANSB,
        };
        use sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES;

        let mut plan = Plan {
            desc: std::ptr::null_mut(),
            layouts: [std::ptr::null_mut(); 3],
            algo: None,
        };
        let (matrix_type, compute_type) = key.types();
        let [transa, transb] = key.transpose;
        let [m, n, k] = key.dims;
        let [lda, ldb, ldc] = key.leading;
        // op(A) is m x k and op(B) k x n; stored, a transposed operand is the other way round.
        let a_dims = if transa { [k, m] } else { [m, k] };
        let b_dims = if transb { [n, k] } else { [k, n] };
        let strides = key
            .batch
            .map(|(count, strides)| strides.map(|s| (count, s)));
        let [a_batch, b_batch, c_batch] = match strides {
            Some(batch) => batch.map(Some),
            None => [None; 3],
        };
        layout(&mut plan.layouts[0], matrix_type, a_dims, lda, a_batch)?;
        layout(&mut plan.layouts[1], matrix_type, b_dims, ldb, b_batch)?;
        layout(&mut plan.layouts[2], key.out_type(), [m, n], ldc, c_batch)?;

        plan.desc = result::create_matmul_desc(compute_type, sys::cudaDataType_t::CUDA_R_32F)?;
        for (attr, transpose) in [
            (CUBLASLT_MATMUL_DESC_TRANSA, transa),
            (CUBLASLT_MATMUL_DESC_TRANSB, transb),
        ] {
            // cublasOperation_t: 0 is N, 1 is T.
            let op = i32::from(transpose);
            // SAFETY: the descriptor is live; the attribute takes a 32-bit operation.
            unsafe {
                result::set_matmul_desc_attribute(
                    plan.desc,
                    attr,
                    (&op as *const i32).cast(),
                    size_of::<i32>(),
                )?;
            }
        }

        let preference = Preference(result::create_matmul_pref()?);
        // SAFETY: the preference is live; the attribute takes the byte count as a u64.
        unsafe {
            let bytes = workspace_bytes as u64;
            result::set_matmul_pref_attribute(
                preference.0,
                CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&bytes as *const u64).cast(),
                size_of::<u64>(),
            )?;
        }
        let [a, b, c] = plan.layouts;
        // SAFETY: every handle is live and made for this product.
        let heuristic = unsafe {
            result::get_matmul_algo_heuristic(handle, plan.desc, a, b, c, c, preference.0)?
        };
        plan.algo = Some(heuristic.algo);
        Ok(plan)
    }
}

/// The plans of one cuBLASLt handle, by shape.
#[derive(Default)]
pub(super) struct Plans {
    plans: HashMap<PlanKey, Plan>,
}

/// Where a product's data lies: cuBLASLt's A, B, C and D (our B, A, the accumulator and the
/// output; C is D unless the product adds into an accumulator of its own, `beta = 1`).
pub(super) struct Buffers {
    pub a: u64,
    pub b: u64,
    pub c: u64,
    pub d: u64,
    pub workspace: u64,
    pub workspace_bytes: usize,
}

impl Plans {
    /// Runs `D = alpha op(A) op(B) + beta C` on `stream` with the plan of `key`, making the
    /// plan on first use.
    ///
    /// # Safety
    /// The buffers must be live device memory of the context of `handle`, large enough for
    /// the product `key` describes, and stay so until the product has run on `stream`.
    pub(super) unsafe fn run(
        &mut self,
        handle: sys::cublasLtHandle_t,
        stream: sys::cudaStream_t,
        key: PlanKey,
        [alpha, beta]: [f32; 2],
        buffers: Buffers,
    ) -> Result<(), Error> {
        let plan = match self.plans.entry(key) {
            std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::hash_map::Entry::Vacant(entry) => {
                entry.insert(Plan::new(handle, &key, buffers.workspace_bytes)?)
            }
        };
        let algo = plan.algo.as_ref().expect("a made plan has its algorithm");
        let [a_layout, b_layout, c_layout] = plan.layouts;
        // SAFETY: the caller vouches for the buffers; the plan's handles are live.
        unsafe {
            result::matmul(
                handle,
                plan.desc,
                (&alpha as *const f32).cast::<c_void>(),
                (&beta as *const f32).cast::<c_void>(),
                buffers.a as *const c_void,
                a_layout,
                buffers.b as *const c_void,
                b_layout,
                buffers.c as *const c_void,
                c_layout,
                buffers.d as *mut c_void,
                c_layout,
                algo,
                buffers.workspace as *mut c_void,
                buffers.workspace_bytes,
                stream,
            )?;
        }
        Ok(())
    }
}
