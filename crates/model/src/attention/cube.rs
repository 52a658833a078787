//! The attention softmax of one score block as one CubeCL kernel each way (used on CUDA).
//!
//! Between its products, a block of the chunked attention runs a chain of tensor ops: a cast,
//! the scale, the mask built from segment ids and positions, a row maximum, `exp`, a row sum, a
//! division and casts; the backward pass recomputes part of it and adds `P (dP - D)`. Each op is
//! a pass over the `[b, heads, rows, keys]` block, and the row reductions end burn's fusion.
//! Here each direction is one kernel: a cube per query row (of one batch row and head), its
//! units striding over the keys and deciding each key's mask from the segment ids on the fly.
//!
//! The arithmetic is the one of [`super::softmax`]'s tensor-op bodies, in the same order, in
//! f32: `s = scale * x`, `m = max s`, `l = sum exp(s - m)`, `p = exp(s - m) / l`,
//! `lse = m + ln l`; backward `p = exp(s - lse)`, `dS = (p (dP - D)) scale`. A forbidden key
//! gets `p = 0`; a row that sees no key gets `p = 0` everywhere and `lse = +inf` (passed in as a
//! run-time scalar: some shading languages have no infinite literal).
//!
//! The grid of a cube per row (`row_id`, `cube_count`) and the cube's shared-memory reduction
//! (`reduce_cube`) serve the row-wise kernels (`rowwise::cube`) too.

use burn::tensor::{DType, Shape};
use burn_cubecl::CubeRuntime;
use burn_cubecl::cubecl;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;

use super::softmax::ScoreBlock;

/// The most units per cube, and the size of the reduction's shared buffer. A power of two, for
/// the tree reductions.
pub(crate) const CUBE_SIZE: usize = 256;

/// Units per cube for a softmax row of `keys` keys: about 16 keys each, a power of two from 32
/// to [`CUBE_SIZE`]. A cube per row makes a step's attention millions of cubes, each two tree
/// reductions long: with 256 units for rows of about a thousand keys, units were mostly waiting
/// at the reductions' barriers (docs/BENCHMARKS.md).
fn softmax_cube_dim(keys: usize) -> CubeDim {
    let units = keys.div_ceil(16).next_power_of_two().clamp(32, CUBE_SIZE);
    CubeDim::new_1d(units as u32)
}

/// The largest cube count along one axis that every runtime takes.
const MAX_CUBES_PER_AXIS: usize = 65_535;

/// The scalar description of a block that both kernels read.
#[derive(CubeLaunch, CubeType)]
struct Geometry {
    /// Query rows in the block.
    rows: u32,
    /// Keys the block sees.
    keys: u32,
    /// Query heads (`kv_heads * n_rep`).
    heads: u32,
    /// Query heads per kv head.
    n_rep: u32,
    /// The block's first query row among the call's queries.
    q_start: u32,
    /// Absolute position among the keys of the block's first query row.
    q_position: u32,
    /// The block's first key.
    k_start: u32,
    /// With a sliding window, its length; `u32::MAX` without.
    window: u32,
    /// `1 / sqrt(head_dim)`.
    scale: f32,
    /// `batch * heads * rows`: the cubes past it have no row.
    total_rows: u32,
}

/// The query row a cube works on, and where its data sits.
#[derive(CubeType)]
struct Row {
    /// Index among every row of the block, `(batch * heads + head) * rows + row`.
    id: usize,
    batch: usize,
    /// The row within the block.
    row: usize,
    /// The query head.
    head: usize,
    /// The kv head it reads, and its row in the `[batch, kv_heads, n_rep * rows, keys]` layout.
    kv_head: usize,
    grouped_row: usize,
    /// The query's segment id (ids are small and non-negative: u32 whatever the int type).
    segment: u32,
}

/// The index of this cube's row; past the last row where the grid overshoots.
#[cube]
pub(crate) fn row_id() -> usize {
    CUBE_POS_X as usize + CUBE_POS_Y as usize * CUBE_COUNT_X as usize
}

/// Row `id` of the block (one that exists).
#[cube]
fn locate_row<I: Int>(query_segments: &Tensor<I>, geometry: &Geometry, id: usize) -> Row {
    let rows = geometry.rows as usize;
    let heads = geometry.heads as usize;
    let n_rep = geometry.n_rep as usize;
    let row = id % rows;
    let head = (id / rows) % heads;
    let batch = id / (rows * heads);
    // [batch, kv_heads, n_rep * rows, keys]: head = kv_head * n_rep + rep.
    let kv_head = head / n_rep;
    let grouped_row = (head % n_rep) * rows + row;
    let q = geometry.q_start as usize + row;
    let segment = u32::cast_from(
        query_segments[batch * query_segments.stride(0) + q * query_segments.stride(1)],
    );
    Row {
        id,
        batch,
        row,
        head,
        kv_head,
        grouped_row,
        segment,
    }
}

/// Offset of key `j` of the row in a `[batch, kv_heads, n_rep * rows, keys]` tensor.
#[cube]
fn grouped_offset<E: Float>(x: &Tensor<E>, row: &Row, j: usize) -> usize {
    row.batch * x.stride(0)
        + row.kv_head * x.stride(1)
        + row.grouped_row * x.stride(2)
        + j * x.stride(3)
}

/// Offset of the row's entry in a `[batch, heads, q_len]` tensor of the whole call.
#[cube]
fn stat_offset(x: &Tensor<f32>, geometry: &Geometry, row: &Row) -> usize {
    let q = geometry.q_start as usize + row.row;
    row.batch * x.stride(0) + row.head * x.stride(1) + q * x.stride(2)
}

/// Whether the row may attend to key `j` of the block: not a future key, the same non-zero
/// segment, and inside the window.
#[cube]
fn allowed<I: Int>(key_segments: &Tensor<I>, geometry: &Geometry, row: &Row, j: usize) -> bool {
    let key = geometry.k_start as usize + j;
    let query = geometry.q_position as usize + row.row;
    let segment = u32::cast_from(
        key_segments[row.batch * key_segments.stride(0) + key * key_segments.stride(1)],
    );
    let mut ok = key <= query && segment != 0 && segment == row.segment;
    if ok {
        ok = query - key < geometry.window as usize;
    }
    ok
}

/// The f32 scaled score of key `j`.
#[cube]
fn scaled<E: Float>(scores: &Tensor<E>, geometry: &Geometry, row: &Row, j: usize) -> f32 {
    f32::cast_from(scores[grouped_offset::<E>(scores, row, j)]) * geometry.scale
}

/// Tree reduction of one value per unit over the cube, by maximum or by sum; every unit gets
/// the result.
#[cube]
pub(crate) fn reduce_cube(value: f32, #[comptime] maximum: bool) -> f32 {
    let mut shared = SharedMemory::<f32>::new(CUBE_SIZE);
    let unit = UNIT_POS_X as usize;
    shared[unit] = value;
    sync_cube();
    // A run-time counter (the cube's size, a power of two up to CUBE_SIZE): a comptime one
    // cannot change.
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

#[cube(launch)]
fn softmax_forward_kernel<E: Float, I: Int>(
    scores: &Tensor<E>,
    query_segments: &Tensor<I>,
    key_segments: &Tensor<I>,
    probs: &mut Tensor<E>,
    lse: &mut Tensor<f32>,
    geometry: Geometry,
    empty_lse: f32,
    #[define(E, I)] _dtypes: [StorageType; 2],
) {
    let id = row_id();
    if id >= geometry.total_rows as usize {
        terminate!();
    }
    let row = locate_row::<I>(query_segments, &geometry, id);
    let keys = geometry.keys as usize;
    let unit = UNIT_POS_X as usize;

    // The row maximum over allowed keys; the lowest f32 (a value no real score takes) if none.
    let lowest = f32::min_value();
    let mut local_max = lowest;
    let mut j = unit;
    while j < keys {
        if allowed::<I>(key_segments, &geometry, &row, j) {
            local_max = max(local_max, scaled::<E>(scores, &geometry, &row, j));
        }
        j += CUBE_DIM_X as usize;
    }
    let row_max = reduce_cube(local_max, true);
    let empty = row_max == lowest;

    let mut local_sum = 0.0f32;
    let mut j = unit;
    while j < keys {
        if allowed::<I>(key_segments, &geometry, &row, j) {
            local_sum += (scaled::<E>(scores, &geometry, &row, j) - row_max).exp();
        }
        j += CUBE_DIM_X as usize;
    }
    let sum = reduce_cube(local_sum, false);

    let out_base = row.id * keys;
    let mut j = unit;
    while j < keys {
        let mut p = 0.0f32;
        if !empty && allowed::<I>(key_segments, &geometry, &row, j) {
            p = (scaled::<E>(scores, &geometry, &row, j) - row_max).exp() / sum;
        }
        probs[out_base + j] = E::cast_from(p);
        j += CUBE_DIM_X as usize;
    }
    if unit == 0 {
        let mut value = empty_lse;
        if !empty {
            value = row_max + sum.ln();
        }
        lse[row.id] = value;
    }
}

/// `lse`, `delta`: `[batch, heads, q_len]` of the whole call (read at the block's rows).
#[cube(launch)]
fn softmax_backward_kernel<E: Float, I: Int>(
    scores: &Tensor<E>,
    grad_probs: &Tensor<E>,
    lse: &Tensor<f32>,
    delta: &Tensor<f32>,
    query_segments: &Tensor<I>,
    key_segments: &Tensor<I>,
    probs: &mut Tensor<E>,
    grad_scores: &mut Tensor<E>,
    geometry: Geometry,
    #[comptime] with_grad: bool,
    #[define(E, I)] _dtypes: [StorageType; 2],
) {
    let id = row_id();
    if id >= geometry.total_rows as usize {
        terminate!();
    }
    let row = locate_row::<I>(query_segments, &geometry, id);
    let keys = geometry.keys as usize;
    let row_lse = lse[stat_offset(lse, &geometry, &row)];
    let mut row_delta = 0.0f32;
    if comptime!(with_grad) {
        row_delta = delta[stat_offset(delta, &geometry, &row)];
    }
    let out_base = row.id * keys;
    let mut j = UNIT_POS_X as usize;
    while j < keys {
        let mut p = 0.0f32;
        if allowed::<I>(key_segments, &geometry, &row, j) {
            p = (scaled::<E>(scores, &geometry, &row, j) - row_lse).exp();
        }
        probs[out_base + j] = E::cast_from(p);
        if comptime!(with_grad) {
            let dp = f32::cast_from(grad_probs[grouped_offset::<E>(grad_probs, &row, j)]);
            grad_scores[out_base + j] = E::cast_from(p * (dp - row_delta) * geometry.scale);
        }
        j += CUBE_DIM_X as usize;
    }
}

/// The grid of one cube per row, split over two axes where one would hold too many.
pub(crate) fn cube_count(rows: usize) -> CubeCount {
    let x = rows.clamp(1, MAX_CUBES_PER_AXIS);
    let y = rows.div_ceil(x).max(1);
    CubeCount::Static(x as u32, y as u32, 1)
}

/// The block's geometry as the kernels take it, and its row count; panics if a size does not
/// fit in `u32`.
fn geometry<R: CubeRuntime>(block: &ScoreBlock) -> (GeometryLaunch<R>, usize) {
    let int = |x: usize| u32::try_from(x).expect("attention block sizes fit in u32");
    let heads = block.kv_heads * block.n_rep;
    let total_rows = block.batch * heads * block.rows;
    let launch = GeometryLaunch::new(
        int(block.rows),
        int(block.keys),
        int(heads),
        int(block.n_rep),
        int(block.q_start),
        int(block.query_offset + block.q_start),
        int(block.k_start),
        block.window.map_or(u32::MAX, int),
        block.scale,
        int(total_rows),
    );
    (launch, total_rows)
}

/// The output tensors of the block: `[batch, kv_heads, n_rep * rows, keys]`, contiguous.
fn block_tensor<R: CubeRuntime>(
    like: &CubeTensor<R>,
    block: &ScoreBlock,
    dtype: DType,
) -> CubeTensor<R> {
    let shape = Shape::new([
        block.batch,
        block.kv_heads,
        block.n_rep * block.rows,
        block.keys,
    ]);
    empty_device_contiguous_dtype(like.client.clone(), like.device.clone(), shape, dtype)
}

fn check_scores<R: CubeRuntime>(scores: &CubeTensor<R>, block: &ScoreBlock) {
    assert_eq!(
        scores.meta.shape().as_slice(),
        &[
            block.batch,
            block.kv_heads,
            block.n_rep * block.rows,
            block.keys
        ],
        "attention softmax: scores do not match the block"
    );
}

/// The forward softmax of one block; see [`super::softmax::forward_reference`] for the shapes.
pub fn softmax_forward<R: CubeRuntime>(
    scores: CubeTensor<R>,
    query_segments: CubeTensor<R>,
    key_segments: CubeTensor<R>,
    block: &ScoreBlock,
) -> (CubeTensor<R>, CubeTensor<R>) {
    check_scores(&scores, block);
    let (geometry, total_rows) = geometry::<R>(block);
    let probs = block_tensor(&scores, block, scores.dtype);
    let lse = empty_device_contiguous_dtype(
        scores.client.clone(),
        scores.device.clone(),
        Shape::new([block.batch, block.kv_heads * block.n_rep, block.rows]),
        DType::F32,
    );
    let dtypes = [scores.dtype.into(), key_segments.dtype.into()];
    let client = scores.client.clone();
    softmax_forward_kernel::launch::<R>(
        &client,
        cube_count(total_rows),
        softmax_cube_dim(block.keys),
        scores.into_tensor_arg(),
        query_segments.into_tensor_arg(),
        key_segments.into_tensor_arg(),
        probs.clone().into_tensor_arg(),
        lse.clone().into_tensor_arg(),
        geometry,
        f32::INFINITY,
        dtypes,
    );
    (probs, lse)
}

/// The backward softmax of one block: the probabilities again and, given `(dP, D)`, the
/// gradient of the unscaled scores; see [`super::softmax::backward_reference`].
pub fn softmax_backward<R: CubeRuntime>(
    scores: CubeTensor<R>,
    lse: CubeTensor<R>,
    grad: Option<(CubeTensor<R>, CubeTensor<R>)>,
    query_segments: CubeTensor<R>,
    key_segments: CubeTensor<R>,
    block: &ScoreBlock,
) -> (CubeTensor<R>, Option<CubeTensor<R>>) {
    check_scores(&scores, block);
    let (geometry, total_rows) = geometry::<R>(block);
    let probs = block_tensor(&scores, block, scores.dtype);
    let with_grad = grad.is_some();
    // Without a gradient the kernel never reads `dP` and `D` nor writes `dS`: it is handed the
    // scores and `lse` in their places, and a one-element `dS`.
    let (grad_probs, delta, grad_scores) = match grad {
        Some((grad_probs, delta)) => {
            check_scores(&grad_probs, block);
            (
                grad_probs,
                delta,
                block_tensor(&scores, block, scores.dtype),
            )
        }
        None => {
            let unused = empty_device_contiguous_dtype(
                scores.client.clone(),
                scores.device.clone(),
                Shape::new([1, 1, 1, 1]),
                scores.dtype,
            );
            (scores.clone(), lse.clone(), unused)
        }
    };
    let dtypes = [scores.dtype.into(), key_segments.dtype.into()];
    let client = scores.client.clone();
    softmax_backward_kernel::launch::<R>(
        &client,
        cube_count(total_rows),
        softmax_cube_dim(block.keys),
        scores.into_tensor_arg(),
        grad_probs.into_tensor_arg(),
        lse.into_tensor_arg(),
        delta.into_tensor_arg(),
        query_segments.into_tensor_arg(),
        key_segments.into_tensor_arg(),
        probs.clone().into_tensor_arg(),
        grad_scores.clone().into_tensor_arg(),
        geometry,
        with_grad,
        dtypes,
    );
    (probs, with_grad.then_some(grad_scores))
}
