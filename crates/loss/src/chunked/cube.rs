//! The chunked loss's element-wise work as two CubeCL kernels (used on CUDA).
//!
//! In tensor ops a forward chunk casts its logits to f32 (a copy twice their size), reduces
//! the rows' maximum, takes `exp` and reduces the sums: four passes over a `[rows, vocab]` tile
//! of f32, each ending burn's fusion. The backward tile is as many again. On the H200 these
//! passes took about half of the loss's time (docs/BENCHMARKS.md, session 14). Here each is
//! one pass over the logits as the product left them (bf16 in training), in f32 registers:
//!
//! - [`row_stats`]: a cube per row, each unit keeping a running maximum and the sum of
//!   `exp(x - max)` rescaled as the maximum grows (one read of the row), and the sum of `x`;
//!   the cube combines them in shared memory. Out: `lse`, the target's logit, the mean logit.
//! - [`logits_grad`]: a unit per logit, `dx = s exp(x - lse) - g ε / V + [c = t] g (ε - 1)`
//!   with the row's `s = g (1 + 2 λ lse)`, `g` and `lse`, written in the logits' dtype.
//!
//! The arithmetic is that of the tensor-op bodies (`kernel::logit_row_stats`,
//! `kernel::logits_grad`) in f32; only the order of the sums differs.

use burn::tensor::{DType, Shape};
use burn_cubecl::CubeRuntime;
use burn_cubecl::cubecl;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;

use super::GradTile;

/// Units per cube of both kernels, and the size of [`row_stats`]' shared buffer (a power of
/// two).
const CUBE_SIZE: usize = 256;

/// Columns each unit of [`row_stats`] loads at once.
const GROUP: usize = 8;

/// The largest cube count along one axis that every runtime takes.
const MAX_CUBES_PER_AXIS: usize = 65_535;

// The cube-per-row grid and the shared-memory reduction below are also in
// `qwen_model::attention::cube`: qwen-loss does not depend on qwen-model (docs/ARCHITECTURE.md,
// "Contracts between crates"), and qwen-gemm, which both use, holds matrix products only.

/// This cube's row; past the last row where the grid overshoots.
#[cube]
fn row_id() -> usize {
    CUBE_POS_X as usize + CUBE_POS_Y as usize * CUBE_COUNT_X as usize
}

/// Tree reduction of one value per unit over the cube, by maximum or by sum; every unit gets
/// the result.
#[cube]
fn reduce_cube(value: f32, #[comptime] maximum: bool) -> f32 {
    let mut shared = SharedMemory::<f32>::new(CUBE_SIZE);
    let unit = UNIT_POS_X as usize;
    shared[unit] = value;
    sync_cube();
    let mut stride = CUBE_DIM_X as usize / 2;
    while stride > 0 {
        if unit < stride {
            if comptime!(maximum) {
                shared[unit] = max(shared[unit], shared[unit + stride]);
            } else {
                shared[unit] = shared[unit] + shared[unit + stride];
            }
        }
        sync_cube();
        stride /= 2;
    }
    let result = shared[0];
    // No unit may overwrite the buffer of a later reduction before every unit has read this.
    sync_cube();
    result
}

/// `logits`: `[rows, vocab]`, whole rows; `targets`: `[rows]`; `stats`: `[rows, 3]`
/// contiguous.
#[cube(launch)]
fn row_stats_kernel<E: Float, I: Int>(
    logits: &Tensor<E>,
    targets: &Tensor<I>,
    stats: &mut Tensor<f32>,
    #[define(E, I)] _dtypes: [StorageType; 2],
) {
    let row = row_id();
    if row >= logits.shape(0) {
        terminate!();
    }
    let cols = logits.shape(1);
    let base = row * logits.stride(0);
    let step = logits.stride(1);
    let unit = UNIT_POS_X as usize;

    // The unit's running maximum `m`, sum of exp(x - m) and sum of x, in one read of its
    // columns, GROUP at a time: their loads in flight together, the sum rescaled once per group.
    let mut m = f32::min_value();
    let mut sum_exp = 0.0f32;
    let mut sum_x = 0.0f32;
    let stride = CUBE_DIM_X as usize;
    let mut xs = Array::<f32>::new(GROUP);
    let mut j = unit;
    while j + (GROUP - 1) * stride < cols {
        let mut group_max = m;
        #[unroll]
        for k in 0..GROUP {
            let x = f32::cast_from(logits[base + (j + k * stride) * step]);
            xs[k] = x;
            group_max = max(group_max, x);
        }
        sum_exp *= (m - group_max).exp();
        m = group_max;
        #[unroll]
        for k in 0..GROUP {
            sum_exp += (xs[k] - m).exp();
            sum_x += xs[k];
        }
        j += GROUP * stride;
    }
    while j < cols {
        let x = f32::cast_from(logits[base + j * step]);
        let new_max = max(m, x);
        sum_exp = sum_exp * (m - new_max).exp() + (x - new_max).exp();
        m = new_max;
        sum_x += x;
        j += stride;
    }
    let row_max = reduce_cube(m, true);
    // A unit with no column has sum 0, whatever exp(m - row_max) is.
    let total = reduce_cube(sum_exp * (m - row_max).exp(), false);
    let total_x = reduce_cube(sum_x, false);
    if unit == 0 {
        let t = usize::cast_from(targets[row * targets.stride(0)]);
        stats[row * 3] = row_max + total.ln();
        stats[row * 3 + 1] = f32::cast_from(logits[base + t * step]);
        stats[row * 3 + 2] = total_x / f32::cast_from(cols);
    }
}

/// `logits`: `[rows, cols]`, columns `col_start..` of the vocabulary; `lse`, `p_scale`, `g`:
/// `[rows]` f32 (any strides); `targets`: `[rows]` vocabulary ids; `out`: `[rows, cols]`
/// contiguous, in the logits' dtype. A unit per column of a cube's 256, a cube row (`y`) per
/// row, striding over rows where there are more than the grid's `y` extent: no division per
/// element.
#[cube(launch)]
fn logits_grad_kernel<E: Float, I: Int>(
    logits: &Tensor<E>,
    lse: &Tensor<f32>,
    p_scale: &Tensor<f32>,
    g: &Tensor<f32>,
    targets: &Tensor<I>,
    out: &mut Tensor<E>,
    col_start: u32,
    eps_over_vocab: f32,
    eps_minus_one: f32,
    #[define(E, I)] _dtypes: [StorageType; 2],
) {
    let cols = logits.shape(1);
    let c = CUBE_POS_X as usize * CUBE_DIM_X as usize + UNIT_POS_X as usize;
    if c >= cols {
        terminate!();
    }
    let column = c + col_start as usize;
    let mut r = CUBE_POS_Y as usize;
    while r < logits.shape(0) {
        let x = f32::cast_from(logits[r * logits.stride(0) + c * logits.stride(1)]);
        let row_g = g[r * g.stride(0)];
        let mut d = (x - lse[r * lse.stride(0)]).exp() * p_scale[r * p_scale.stride(0)]
            - row_g * eps_over_vocab;
        if usize::cast_from(targets[r * targets.stride(0)]) == column {
            d += row_g * eps_minus_one;
        }
        out[r * cols + c] = E::cast_from(d);
        r += CUBE_COUNT_Y as usize;
    }
}

/// Per-row `[lse, target logit, mean logit]` of whole rows of logits, `[rows, 3]` f32.
///
/// # Shapes
/// - `logits`: `[rows, vocab]`, `targets`: `[rows]` in range
pub fn row_stats<R: CubeRuntime>(logits: CubeTensor<R>, targets: CubeTensor<R>) -> CubeTensor<R> {
    let dims = logits.meta.shape().as_slice().to_vec();
    let [rows, _] = dims[..] else {
        panic!("row_stats: logits must be [rows, vocab], not {dims:?}")
    };
    let stats = empty_device_contiguous_dtype(
        logits.client.clone(),
        logits.device.clone(),
        Shape::new([rows, 3]),
        DType::F32,
    );
    if rows == 0 {
        return stats;
    }
    let x = rows.min(MAX_CUBES_PER_AXIS);
    let count = CubeCount::Static(x as u32, rows.div_ceil(x) as u32, 1);
    let client = logits.client.clone();
    let dtypes = [logits.dtype.into(), targets.dtype.into()];
    row_stats_kernel::launch::<R>(
        &client,
        count,
        CubeDim::new_1d(CUBE_SIZE as u32),
        logits.into_tensor_arg(),
        targets.into_tensor_arg(),
        stats.clone().into_tensor_arg(),
        dtypes,
    );
    stats
}

/// The gradient of the loss with respect to a tile of logits, in their dtype.
///
/// # Shapes
/// - `logits`: `[rows, cols]`; `lse`, `p_scale`, `g`: `[rows]` f32; `targets`: `[rows]`
pub fn logits_grad<R: CubeRuntime>(
    logits: CubeTensor<R>,
    lse: CubeTensor<R>,
    p_scale: CubeTensor<R>,
    g: CubeTensor<R>,
    targets: CubeTensor<R>,
    tile: GradTile,
) -> CubeTensor<R> {
    let dims = logits.meta.shape().as_slice().to_vec();
    let [rows, cols] = dims[..] else {
        panic!("logits_grad: logits must be [rows, cols], not {dims:?}")
    };
    for (name, t) in [("lse", &lse), ("p_scale", &p_scale), ("g", &g)] {
        assert_eq!(t.dtype, DType::F32, "logits_grad: {name} must be f32");
    }
    let out = empty_device_contiguous_dtype(
        logits.client.clone(),
        logits.device.clone(),
        Shape::new([rows, cols]),
        logits.dtype,
    );
    if rows * cols == 0 {
        return out;
    }
    let client = logits.client.clone();
    let dtypes = [logits.dtype.into(), targets.dtype.into()];
    let col_start = u32::try_from(tile.col_start).expect("vocabulary ids fit in u32");
    let column_cubes = cols.div_ceil(CUBE_SIZE);
    assert!(
        column_cubes <= MAX_CUBES_PER_AXIS,
        "logits_grad: {cols} columns in one tile"
    );
    let count = CubeCount::Static(column_cubes as u32, rows.min(MAX_CUBES_PER_AXIS) as u32, 1);
    logits_grad_kernel::launch::<R>(
        &client,
        count,
        CubeDim::new_1d(CUBE_SIZE as u32),
        logits.into_tensor_arg(),
        lse.into_tensor_arg(),
        p_scale.into_tensor_arg(),
        g.into_tensor_arg(),
        targets.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        col_start,
        tile.label_smoothing / tile.vocab as f32,
        tile.label_smoothing - 1.0,
        dtypes,
    );
    out
}
