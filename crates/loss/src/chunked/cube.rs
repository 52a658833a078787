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
//! - [`logits_grad`]: a cube per row, `dx = s exp(x - lse) - g ε / V + [c = t] g (ε - 1)`
//!   with the row's `s = g (1 + 2 λ lse)`, `g` and `lse`, written in the logits' dtype.
//!
//! Both read and write rows a vector at a time (16 bytes on CUDA, [`row_vector_size`]): with
//! a scalar per unit and per-element index arithmetic they ran at a quarter to a half of the
//! H200's bandwidth (session 14's step breakdown).
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

/// Vectors each unit of [`row_stats`] has in flight at once.
const GROUP: usize = 4;

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

/// `logits`: `[rows, vocab]`, whole rows, read `N` columns at a time; `targets`: `[rows]`;
/// `stats`: `[rows, 3]` contiguous.
#[cube(launch)]
fn row_stats_kernel<E: Float, I: Int, N: Size>(
    logits: &Tensor<Vector<E, N>>,
    targets: &Tensor<I>,
    stats: &mut Tensor<f32>,
    #[define(E, I)] _dtypes: [StorageType; 2],
) {
    let row = row_id();
    if row >= logits.shape(0) {
        terminate!();
    }
    let n = logits.vector_size();
    let cols = logits.shape(1);
    let vectors = cols / n;
    let base = row * logits.stride(0) / n;
    let unit = UNIT_POS_X as usize;

    // The unit's running maximum `m`, sum of exp(x - m) and sum of x, in one read of its
    // vectors, GROUP at a time: their loads in flight together, the sum rescaled once per group.
    let mut m = f32::min_value();
    let mut sum_exp = 0.0f32;
    let mut sum_x = 0.0f32;
    let stride = CUBE_DIM_X as usize;
    let mut xs = Array::<Vector<f32, N>>::new(GROUP);
    let mut j = unit;
    while j + (GROUP - 1) * stride < vectors {
        let mut group_max = m;
        #[unroll]
        for k in 0..GROUP {
            let x = Vector::<f32, N>::cast_from(logits[base + j + k * stride]);
            xs[k] = x;
            group_max = max(group_max, vector_max(x));
        }
        sum_exp *= (m - group_max).exp();
        m = group_max;
        #[unroll]
        for k in 0..GROUP {
            let e = (xs[k] - Vector::new(m)).exp();
            sum_exp += vector_sum(e);
            sum_x += vector_sum(xs[k]);
        }
        j += GROUP * stride;
    }
    while j < vectors {
        let x = Vector::<f32, N>::cast_from(logits[base + j]);
        let new_max = max(m, vector_max(x));
        sum_exp = sum_exp * (m - new_max).exp() + vector_sum((x - Vector::new(new_max)).exp());
        m = new_max;
        sum_x += vector_sum(x);
        j += stride;
    }
    let row_max = reduce_cube(m, true);
    // A unit with no column has sum 0, whatever exp(m - row_max) is.
    let total = reduce_cube(sum_exp * (m - row_max).exp(), false);
    let total_x = reduce_cube(sum_x, false);
    if unit == 0 {
        let t = usize::cast_from(targets[row * targets.stride(0)]);
        stats[row * 3] = row_max + total.ln();
        stats[row * 3 + 1] = element(logits[base + t / n], t % n);
        stats[row * 3 + 2] = total_x / f32::cast_from(cols);
    }
}

/// The largest of a vector's elements.
#[cube]
fn vector_max<N: Size>(x: Vector<f32, N>) -> f32 {
    let mut m = x[0];
    #[unroll]
    for k in 1..x.vector_size() {
        m = max(m, x[k]);
    }
    m
}

/// The sum of a vector's elements.
#[cube]
fn vector_sum<N: Size>(x: Vector<f32, N>) -> f32 {
    let mut s = x[0];
    #[unroll]
    for k in 1..x.vector_size() {
        s += x[k];
    }
    s
}

/// Element `k` of a vector, in f32 (`k` known only at run time: a select per lane).
#[cube]
fn element<E: Float, N: Size>(x: Vector<E, N>, k: usize) -> f32 {
    let mut value = f32::cast_from(x[0]);
    #[unroll]
    for lane in 1..x.vector_size() {
        if k == lane {
            value = f32::cast_from(x[lane]);
        }
    }
    value
}

/// `logits`: `[rows, cols]`, columns `col_start..` of the vocabulary, read `N` at a time;
/// `lse`, `p_scale`, `g`: `[rows]` f32 (any strides); `targets`: `[rows]` vocabulary ids;
/// `out`: `[rows, cols]` contiguous, in the logits' dtype. A cube per row: the row's scalars
/// are read once, its units stride over its vectors.
#[cube(launch)]
fn logits_grad_kernel<E: Float, I: Int, N: Size>(
    logits: &Tensor<Vector<E, N>>,
    lse: &Tensor<f32>,
    p_scale: &Tensor<f32>,
    g: &Tensor<f32>,
    targets: &Tensor<I>,
    out: &mut Tensor<Vector<E, N>>,
    col_start: u32,
    eps_over_vocab: f32,
    eps_minus_one: f32,
    #[define(E, I)] _dtypes: [StorageType; 2],
) {
    let row = row_id();
    if row >= logits.shape(0) {
        terminate!();
    }
    let n = logits.vector_size();
    let vectors = logits.shape(1) / n;
    let base = row * logits.stride(0) / n;
    let out_base = row * out.stride(0) / n;
    let row_g = g[row * g.stride(0)];
    let row_lse = Vector::<f32, N>::new(lse[row * lse.stride(0)]);
    let scale = Vector::<f32, N>::new(p_scale[row * p_scale.stride(0)]);
    let smooth = Vector::<f32, N>::new(row_g * eps_over_vocab);
    // The target's column within this tile, as a signed offset: negative or past the tile's
    // end where the target lies in another tile.
    let target = i64::cast_from(targets[row * targets.stride(0)]) - i64::cast_from(col_start);
    let hit = row_g * eps_minus_one;
    let mut j = UNIT_POS_X as usize;
    while j < vectors {
        let x = Vector::<f32, N>::cast_from(logits[base + j]);
        let mut d = (x - row_lse).exp() * scale - smooth;
        let first = i64::cast_from(j * n);
        if target >= first && target < first + i64::cast_from(n) {
            let k = usize::cast_from(target - first);
            #[unroll]
            for lane in 0..n {
                if k == lane {
                    d[lane] += hit;
                }
            }
        }
        out[out_base + j] = Vector::cast_from(d);
        j += CUBE_DIM_X as usize;
    }
}

/// A cube per row: `x` by `y` cubes, `x` at most [`MAX_CUBES_PER_AXIS`].
fn row_cubes(rows: usize) -> CubeCount {
    let x = rows.clamp(1, MAX_CUBES_PER_AXIS);
    CubeCount::Static(x as u32, rows.div_ceil(x) as u32, 1)
}

/// `x` itself where its columns are contiguous (the products' tiles), else a contiguous copy:
/// the kernels step through a row's columns in memory order.
fn unit_columns<R: CubeRuntime>(x: CubeTensor<R>) -> CubeTensor<R> {
    if x.meta.strides()[1] == 1 {
        x
    } else {
        burn_cubecl::kernel::into_contiguous(x)
    }
}

/// The most elements a unit may load at once from every row of these `[rows, cols]` tensors
/// (of one dtype, columns contiguous): the runtime's widest load that divides the row length,
/// every row's start and the buffer's offset; 1 where none does.
fn row_vector_size<R: CubeRuntime>(tensors: &[&CubeTensor<R>]) -> VectorSize {
    let first = tensors[0];
    let elem = first.dtype.size();
    first
        .client
        .io_optimized_vector_sizes(elem)
        .filter(|&n| {
            tensors.iter().all(|t| {
                let shape = t.meta.shape().as_slice();
                let strides = t.meta.strides();
                let offset = t.handle.offset_start.unwrap_or(0) as usize;
                shape[1].is_multiple_of(n)
                    && strides[0].is_multiple_of(n)
                    && offset.is_multiple_of(n * elem)
            })
        })
        .max()
        .unwrap_or(1)
}

/// Per-row `[lse, target logit, mean logit]` of whole rows of logits, `[rows, 3]` f32.
///
/// # Shapes
/// - `logits`: `[rows, vocab]`, `targets`: `[rows]` in range
pub fn row_stats<R: CubeRuntime>(logits: CubeTensor<R>, targets: CubeTensor<R>) -> CubeTensor<R> {
    let logits = unit_columns(logits);
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
    let client = logits.client.clone();
    let dtypes = [logits.dtype.into(), targets.dtype.into()];
    let vector_size = row_vector_size(&[&logits]);
    row_stats_kernel::launch::<R>(
        &client,
        row_cubes(rows),
        CubeDim::new_1d(CUBE_SIZE as u32),
        vector_size,
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
    let logits = unit_columns(logits);
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
    let vector_size = row_vector_size(&[&logits, &out]);
    logits_grad_kernel::launch::<R>(
        &client,
        row_cubes(rows),
        CubeDim::new_1d(CUBE_SIZE as u32),
        vector_size,
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
