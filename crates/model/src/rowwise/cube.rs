//! The rotary embedding as one CubeCL kernel each way, RMSNorm's forward and the gradient of
//! its input as one kernel each, SwiGLU's backward and the token embedding's gradient as one
//! kernel each.
//!
//! RMSNorm in tensor ops is four kernels forward (the squared mean fused into a reduction, then
//! the two broadcast products alone) and several backward; here a cube takes one row, sums in
//! shared memory (the attention kernels' reduction) and writes the row. The weight's gradient,
//! a sum over rows, stays in tensor ops.
//!
//! The rotary embedding:
//!
//! In tensor ops it is six kernels per tensor and direction: burn's fuser leaves the negation,
//! the two slice assignments of the `cat`, the two broadcast products and the sum each on its
//! own (docs/BENCHMARKS.md, "Kernel launches per training step"). Here a unit takes `N`
//! pairs `(i, i + half)` of one row, reads `x` through its strides (the model hands in a
//! `swap_dims` view) and the tables through theirs, and writes both results, computing in f32
//! with each product rounded to the activations' dtype, as the tensor ops round it:
//!
//! ```text
//! forward:  y1 = x1 c1 - x2 s1,  y2 = x2 c2 + x1 s2      (x c + rotate_half(x) s)
//! backward: y1 = x1 c1 + x2 s2,  y2 = x2 c2 - x1 s1      (dy c - rotate_half(dy s))
//! ```
//!
//! All of them load and store `N` elements at once (16 bytes on CUDA, [`vector_size`]): one
//! element per unit, with its index arithmetic, ran them at a quarter to a third of the H200's
//! bandwidth (session 14's step breakdown: the rotary embedding of q at 80 us, RMSNorm at 60
//! and 76 us, for 29 MB each way).

use burn::tensor::{DType, Shape};
use burn_cubecl::CubeRuntime;
use burn_cubecl::cubecl;
use burn_cubecl::cubecl::features::AtomicUsage;
use burn_cubecl::cubecl::ir::FloatKind;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;

use crate::attention::cube::{CUBE_SIZE, cube_count, reduce_cube, row_id};

/// `v` rounded to `E` and back, lane by lane: a no-op for f32. A product of two values of `E`
/// (bf16, f16) is exact in f32, so this is the product that a multiplication in `E` returns.
#[cube]
fn in_dtype<E: Float, N: Size>(v: Vector<f32, N>) -> Vector<f32, N> {
    Vector::<f32, N>::cast_from(Vector::<E, N>::cast_from(v))
}

/// `x`: `[batch, heads, seq, head_dim]`; `cos`, `sin`: `[batch or 1, 1, seq, head_dim]`;
/// `out`: `[batch, seq, heads, head_dim]`, contiguous. Each tensor's last dimension is
/// contiguous; a unit takes `N` pairs of one row, units in `out`'s memory order.
#[cube(launch)]
fn rotary_kernel<E: Float, N: Size>(
    x: &Tensor<Vector<E, N>>,
    cos: &Tensor<Vector<E, N>>,
    sin: &Tensor<Vector<E, N>>,
    out: &mut Tensor<Vector<E, N>>,
    #[comptime] backward: bool,
    #[define(E)] _dtype: StorageType,
) {
    let n = x.vector_size();
    let heads = x.shape(1);
    let seq = x.shape(2);
    let half = x.shape(3) / 2;
    let groups = half / n;
    let id = ABSOLUTE_POS;
    if id >= x.shape(0) * heads * seq * groups {
        terminate!();
    }
    let i = (id % groups) * n;
    let h = (id / groups) % heads;
    let s = (id / (groups * heads)) % seq;
    let b = id / (groups * heads * seq);

    let row = b * x.stride(0) + h * x.stride(1) + s * x.stride(2) + i;
    let x1 = Vector::<f32, N>::cast_from(x[row / n]);
    let x2 = Vector::<f32, N>::cast_from(x[(row + half) / n]);
    // The tables have one head, and one batch row when every row shares the positions.
    let mut tb = b;
    if cos.shape(0) == 1 {
        tb = 0;
    }
    let c = tb * cos.stride(0) + s * cos.stride(2) + i;
    let c1 = Vector::<f32, N>::cast_from(cos[c / n]);
    let c2 = Vector::<f32, N>::cast_from(cos[(c + half) / n]);
    let t = tb * sin.stride(0) + s * sin.stride(2) + i;
    let s1 = Vector::<f32, N>::cast_from(sin[t / n]);
    let s2 = Vector::<f32, N>::cast_from(sin[(t + half) / n]);

    // Each product rounded to E before the sum, as the tensor ops (one op each) round them, so
    // that bf16 gives the reference's values and not merely closer ones.
    let mut y1 = in_dtype::<E, N>(x1 * c1) - in_dtype::<E, N>(x2 * s1);
    let mut y2 = in_dtype::<E, N>(x2 * c2) + in_dtype::<E, N>(x1 * s2);
    if comptime!(backward) {
        y1 = in_dtype::<E, N>(x1 * c1) + in_dtype::<E, N>(x2 * s2);
        y2 = in_dtype::<E, N>(x2 * c2) - in_dtype::<E, N>(x1 * s1);
    }
    // `out` is [batch, seq, heads, head_dim] in memory (see `rotary`).
    let o = ((b * seq + s) * heads + h) * 2 * half + i;
    out[o / n] = Vector::cast_from(y1);
    out[(o + half) / n] = Vector::cast_from(y2);
}

/// `x` itself where its last dimension is contiguous, else a contiguous copy: the kernels
/// step through the last dimension in memory order, `N` elements at a time.
fn unit_last_stride<R: CubeRuntime>(x: CubeTensor<R>) -> CubeTensor<R> {
    if x.meta.strides().last() == Some(&1) {
        x
    } else {
        burn_cubecl::kernel::into_contiguous(x)
    }
}

/// The most elements a unit may load at once from these tensors (of one dtype, last dimension
/// contiguous), stepping through runs of `run` elements: the runtime's widest load that
/// divides `run`, every other stride and each buffer's offset; 1 where none does.
fn vector_size<R: CubeRuntime>(tensors: &[&CubeTensor<R>], run: usize) -> VectorSize {
    let first = tensors[0];
    let elem = first.dtype.size();
    first
        .client
        .io_optimized_vector_sizes(elem)
        .filter(|&n| {
            run.is_multiple_of(n)
                && tensors.iter().all(|t| {
                    let strides = t.meta.strides();
                    let offset = t.handle.offset_start.unwrap_or(0) as usize;
                    strides[..strides.len() - 1]
                        .iter()
                        .all(|s| s.is_multiple_of(n))
                        && offset.is_multiple_of(n * elem)
                })
        })
        .max()
        .unwrap_or(1)
}

/// The rotary embedding of `x` (`backward`: its gradient, given the upstream gradient as `x`);
/// see [`super::rotary_forward`] and [`super::rotary_backward`] for the shapes.
pub fn rotary<R: CubeRuntime>(
    x: CubeTensor<R>,
    cos: CubeTensor<R>,
    sin: CubeTensor<R>,
    backward: bool,
) -> CubeTensor<R> {
    let dims = x.meta.shape().as_slice().to_vec();
    let [batch, _, seq, head_dim] = dims[..] else {
        panic!("rotary: x must be [batch, heads, seq, head_dim], not {dims:?}")
    };
    for table in [&cos, &sin] {
        let t = table.meta.shape().as_slice();
        assert!(
            t.len() == 4
                && (t[0] == batch || t[0] == 1)
                && t[1] == 1
                && t[2] == seq
                && t[3] == head_dim,
            "rotary: a table is {t:?} for x {dims:?}"
        );
        assert_eq!(
            table.dtype, x.dtype,
            "rotary: the tables and x differ in dtype"
        );
    }
    assert!(head_dim % 2 == 0, "rotary: odd head_dim {head_dim}");
    let [x, cos, sin] = [x, cos, sin].map(unit_last_stride);
    // Written as [batch, seq, heads, head_dim] and given back as a [batch, heads, seq,
    // head_dim] view of it: the layout the projections use, so that the model's swap back
    // (the gradient of q and k on its way to their projections) costs no copy.
    let out = empty_device_contiguous_dtype(
        x.client.clone(),
        x.device.clone(),
        Shape::new([batch, seq, dims[1], head_dim]),
        x.dtype,
    );
    let vector_size = vector_size(&[&x, &cos, &sin, &out], head_dim / 2);
    let units = dims.iter().product::<usize>() / 2 / vector_size;
    let client = x.client.clone();
    let cube_dim = CubeDim::new_1d(CUBE_SIZE as u32);
    let dtype = x.dtype.into();
    rotary_kernel::launch::<R>(
        &client,
        cubecl::calculate_cube_count_elemwise(&client, units, cube_dim),
        cube_dim,
        vector_size,
        x.into_tensor_arg(),
        cos.into_tensor_arg(),
        sin.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        backward,
        dtype,
    );
    let mut out = out;
    out.meta.swap(1, 2);
    out
}

/// The sum of a vector's lanes.
#[cube]
fn lane_sum<N: Size>(x: Vector<f32, N>) -> f32 {
    let mut s = x[0];
    #[unroll]
    for k in 1..x.vector_size() {
        s += x[k];
    }
    s
}

/// RMSNorm of one row per cube: `x` `[rows, hidden]` (rows at any pitch), `weight` `[hidden]`;
/// writes `y` `[rows, hidden]` (contiguous) and `rstd` `[rows]`, `N` columns per load. The
/// arithmetic of [`super::rms_norm_forward`]: the squares summed and the rows scaled in f32,
/// the normalised row rounded to the activations' dtype, then multiplied by the weight in that
/// dtype.
#[cube(launch)]
fn rms_norm_forward_kernel<E: Float, N: Size>(
    x: &Tensor<Vector<E, N>>,
    weight: &Tensor<Vector<E, N>>,
    y: &mut Tensor<Vector<E, N>>,
    rstd: &mut Tensor<f32>,
    eps: f32,
    #[define(E)] _dtype: StorageType,
) {
    let row = row_id();
    if row >= x.shape(0) {
        terminate!();
    }
    let n = x.vector_size();
    let hidden = x.shape(1);
    let vectors = hidden / n;
    let base = row * x.stride(0) / n;
    let mut local = 0.0f32;
    let mut j = UNIT_POS_X as usize;
    while j < vectors {
        let v = Vector::<f32, N>::cast_from(x[base + j]);
        local += lane_sum(v * v);
        j += CUBE_DIM_X as usize;
    }
    let sum = reduce_cube(local, false);
    let r = 1.0f32 / (sum / f32::cast_from(hidden) + eps).sqrt();
    let out = row * vectors;
    let mut j = UNIT_POS_X as usize;
    while j < vectors {
        let normed =
            Vector::<E, N>::cast_from(Vector::<f32, N>::cast_from(x[base + j]) * Vector::new(r));
        y[out + j] = normed * weight[j];
        j += CUBE_DIM_X as usize;
    }
    if UNIT_POS_X == 0 {
        rstd[row] = r;
    }
}

/// The gradient of RMSNorm with respect to `x`, one row per cube (`x`, `grad` `[rows, hidden]`,
/// `rstd` `[rows]` f32, `weight` `[hidden]`; `dx` contiguous), as
/// [`super::rms_norm_backward`]: `g = (dy * w)` in the activations' dtype, then in f32
/// `dx = rstd * (g - n * mean(g * n))` with `n = x * rstd`; with `accumulate`, `acc + dx`
/// (`acc` `[rows, hidden]`, columns contiguous).
#[cube(launch)]
fn rms_norm_backward_kernel<E: Float, N: Size>(
    x: &Tensor<Vector<E, N>>,
    rstd: &Tensor<f32>,
    weight: &Tensor<Vector<E, N>>,
    grad: &Tensor<Vector<E, N>>,
    acc: &Tensor<Vector<E, N>>,
    dx: &mut Tensor<Vector<E, N>>,
    #[comptime] accumulate: bool,
    #[define(E)] _dtype: StorageType,
) {
    let row = row_id();
    if row >= x.shape(0) {
        terminate!();
    }
    let n = x.vector_size();
    let hidden = x.shape(1);
    let vectors = hidden / n;
    let r = Vector::<f32, N>::new(rstd[row * rstd.stride(0)]);
    let xb = row * x.stride(0) / n;
    let gb = row * grad.stride(0) / n;
    let mut local = 0.0f32;
    let mut j = UNIT_POS_X as usize;
    while j < vectors {
        let g = Vector::<f32, N>::cast_from(grad[gb + j] * weight[j]);
        local += lane_sum(g * (Vector::<f32, N>::cast_from(x[xb + j]) * r));
        j += CUBE_DIM_X as usize;
    }
    let dot = Vector::<f32, N>::new(reduce_cube(local, false) / f32::cast_from(hidden));
    let out = row * vectors;
    let mut j = UNIT_POS_X as usize;
    while j < vectors {
        let g = Vector::<f32, N>::cast_from(grad[gb + j] * weight[j]);
        let normed = Vector::<f32, N>::cast_from(x[xb + j]) * r;
        let mut value = Vector::<E, N>::cast_from((g - normed * dot) * r);
        if comptime!(accumulate) {
            // Rounded to E, then added in E: the values of `acc + dx` as two ops.
            value += acc[row * acc.stride(0) / n + j];
        }
        dx[out + j] = value;
        j += CUBE_DIM_X as usize;
    }
}

fn check_rows<R: CubeRuntime>(what: &str, x: &CubeTensor<R>, weight: &CubeTensor<R>) -> [usize; 2] {
    let dims = x.meta.shape().as_slice();
    let [rows, hidden] = dims[..] else {
        panic!("{what}: x must be [rows, hidden], not {dims:?}")
    };
    assert_eq!(
        weight.meta.shape().as_slice(),
        &[hidden],
        "{what}: the weight does not match x"
    );
    assert_eq!(
        weight.dtype, x.dtype,
        "{what}: the weight and x differ in dtype"
    );
    [rows, hidden]
}

/// Units per cube of the RMSNorm kernels: about one vector of the row each (a power of two,
/// 32 to [`CUBE_SIZE`]; the cube's reduction wants a power of two).
fn norm_cube_dim(vectors: usize) -> CubeDim {
    CubeDim::new_1d(vectors.next_power_of_two().clamp(32, CUBE_SIZE) as u32)
}

/// RMSNorm forward: `y` in `x`'s dtype and `rstd` `[rows, 1]` f32; see
/// [`super::rms_norm_forward`].
pub fn rms_norm_forward<R: CubeRuntime>(
    x: CubeTensor<R>,
    weight: CubeTensor<R>,
    eps: f64,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let [rows, hidden] = check_rows("rms_norm", &x, &weight);
    let [x, weight] = [x, weight].map(unit_last_stride);
    let empty = |shape: [usize; 2], dtype| {
        empty_device_contiguous_dtype(x.client.clone(), x.device.clone(), Shape::new(shape), dtype)
    };
    let y = empty([rows, hidden], x.dtype);
    let rstd = empty([rows, 1], DType::F32);
    let vector_size = vector_size(&[&x, &weight, &y], hidden);
    let client = x.client.clone();
    let dtype = x.dtype.into();
    rms_norm_forward_kernel::launch::<R>(
        &client,
        cube_count(rows),
        norm_cube_dim(hidden / vector_size),
        vector_size,
        x.into_tensor_arg(),
        weight.into_tensor_arg(),
        y.clone().into_tensor_arg(),
        rstd.clone().into_tensor_arg(),
        eps as f32,
        dtype,
    );
    (y, rstd)
}

/// The gradient of RMSNorm with respect to `x` (see [`super::rms_norm_backward`]), added to
/// `acc` where given.
pub fn rms_norm_backward_x<R: CubeRuntime>(
    x: CubeTensor<R>,
    rstd: CubeTensor<R>,
    weight: CubeTensor<R>,
    grad: CubeTensor<R>,
    acc: Option<CubeTensor<R>>,
) -> CubeTensor<R> {
    let [rows, hidden] = check_rows("rms_norm backward", &x, &weight);
    assert_eq!(
        grad.meta.shape().as_slice(),
        &[rows, hidden],
        "rms_norm backward: grad"
    );
    assert_eq!(
        rstd.meta.shape().as_slice(),
        &[rows, 1],
        "rms_norm backward: rstd"
    );
    if let Some(acc) = &acc {
        assert!(
            acc.meta.shape().as_slice() == [rows, hidden] && acc.dtype == x.dtype,
            "rms_norm backward: the accumulator is {:?} {:?}, not x's",
            acc.meta.shape().as_slice(),
            acc.dtype
        );
    }
    let [x, weight, grad] = [x, weight, grad].map(unit_last_stride);
    let accumulate = acc.is_some();
    // Without an accumulator the kernel never reads it: `grad` stands in.
    let acc = unit_last_stride(acc.unwrap_or_else(|| grad.clone()));
    let dx = empty_device_contiguous_dtype(
        x.client.clone(),
        x.device.clone(),
        Shape::new([rows, hidden]),
        x.dtype,
    );
    let vector_size = vector_size(&[&x, &weight, &grad, &acc, &dx], hidden);
    let client = x.client.clone();
    let dtype = x.dtype.into();
    rms_norm_backward_kernel::launch::<R>(
        &client,
        cube_count(rows),
        norm_cube_dim(hidden / vector_size),
        vector_size,
        x.into_tensor_arg(),
        rstd.into_tensor_arg(),
        weight.into_tensor_arg(),
        grad.into_tensor_arg(),
        acc.into_tensor_arg(),
        dx.clone().into_tensor_arg(),
        accumulate,
        dtype,
    );
    dx
}

/// SwiGLU's backward, `N` elements per unit, in f32 with one rounding per result: with
/// `s = sigmoid(gate)`, `d up = dy gate s` and `d gate = dy up s (1 + gate (1 - s))`. All
/// tensors `[rows, cols]` (rows at any pitch, columns contiguous); the results contiguous.
#[cube(launch)]
fn swiglu_backward_kernel<E: Float, N: Size>(
    gate: &Tensor<Vector<E, N>>,
    up: &Tensor<Vector<E, N>>,
    grad: &Tensor<Vector<E, N>>,
    d_gate: &mut Tensor<Vector<E, N>>,
    d_up: &mut Tensor<Vector<E, N>>,
    #[define(E)] _dtype: StorageType,
) {
    let n = gate.vector_size();
    let vectors = gate.shape(1) / n;
    if ABSOLUTE_POS >= gate.shape(0) * vectors {
        terminate!();
    }
    let row = ABSOLUTE_POS / vectors;
    let j = ABSOLUTE_POS % vectors;
    let g = Vector::<f32, N>::cast_from(gate[row * gate.stride(0) / n + j]);
    let u = Vector::<f32, N>::cast_from(up[row * up.stride(0) / n + j]);
    let dy = Vector::<f32, N>::cast_from(grad[row * grad.stride(0) / n + j]);
    let one = Vector::<f32, N>::new(1.0);
    // `0 - g`: CubeCL's CUDA target has no unary minus on vectors.
    let s = one / (one + (Vector::<f32, N>::new(0.0) - g).exp());
    d_up[ABSOLUTE_POS] = Vector::cast_from(dy * g * s);
    d_gate[ABSOLUTE_POS] = Vector::cast_from(dy * u * s * (one + g * (one - s)));
}

/// The gradients of `silu(gate) * up` with respect to `gate` and `up` (in that order), in
/// their dtype; see [`super::swiglu_backward`].
pub fn swiglu_backward<R: CubeRuntime>(
    gate: CubeTensor<R>,
    up: CubeTensor<R>,
    grad: CubeTensor<R>,
) -> [CubeTensor<R>; 2] {
    let dims = gate.meta.shape().as_slice().to_vec();
    let [rows, cols] = dims[..] else {
        panic!("swiglu backward: gate must be [rows, cols], not {dims:?}")
    };
    for (name, t) in [("up", &up), ("grad", &grad)] {
        assert_eq!(
            t.meta.shape().as_slice(),
            &dims[..],
            "swiglu backward: {name} does not match gate"
        );
        assert_eq!(t.dtype, gate.dtype, "swiglu backward: {name}'s dtype");
    }
    let [gate, up, grad] = [gate, up, grad].map(unit_last_stride);
    let empty = || {
        empty_device_contiguous_dtype(
            gate.client.clone(),
            gate.device.clone(),
            Shape::new([rows, cols]),
            gate.dtype,
        )
    };
    let (d_gate, d_up) = (empty(), empty());
    let vector_size = vector_size(&[&gate, &up, &grad, &d_gate, &d_up], cols);
    let client = gate.client.clone();
    let cube_dim = CubeDim::new_1d(CUBE_SIZE as u32);
    let count = cubecl::calculate_cube_count_elemwise(&client, rows * cols / vector_size, cube_dim);
    let dtype = gate.dtype.into();
    swiglu_backward_kernel::launch::<R>(
        &client,
        count,
        cube_dim,
        vector_size,
        gate.into_tensor_arg(),
        up.into_tensor_arg(),
        grad.into_tensor_arg(),
        d_gate.clone().into_tensor_arg(),
        d_up.clone().into_tensor_arg(),
        dtype,
    );
    [d_gate, d_up]
}

/// Units of a column-sum cube along the columns (each a vector of them) and along the rows.
const SUM_COLUMN_UNITS: usize = 32;
const SUM_ROW_UNITS: usize = 8;
/// Cubes a column sum aims at: about four per SM of an H200, whatever the column count.
const SUM_CUBES: usize = 512;
/// The most parts whose cubes add into one row of sums by atomics: each column's value takes
/// one atomic addition per part, and those to one address wait on each other (at 256 parts a
/// `[16384, 128]` bf16 sum, 4 MB, took 16 us on the H200, s19 call 3).
const SUM_ATOMIC_PARTS: usize = 32;
/// The fewest rows of a part: eight for each of a cube's row units.
const SUM_MIN_PART_ROWS: usize = 8 * SUM_ROW_UNITS;
/// The widest vector of any dtype (8 bf16 in 16 bytes), for the sums' shared buffer.
const MAX_LANES: usize = 8;

/// Adds the cube's units' partial sums along its rows, lane by lane: the cube's vector of
/// column sums, valid in the units of row 0 (whose column is within the row).
#[cube]
fn cube_column_total<N: Size>(acc: Vector<f32, N>) -> Vector<f32, N> {
    let n = acc.vector_size();
    let mut shared = SharedMemory::<f32>::new(SUM_ROW_UNITS * SUM_COLUMN_UNITS * MAX_LANES);
    let x = UNIT_POS_X as usize;
    let slot = (UNIT_POS_Y as usize * SUM_COLUMN_UNITS + x) * MAX_LANES;
    #[unroll]
    for k in 0..n {
        shared[slot + k] = acc[k];
    }
    sync_cube();
    let mut total = acc;
    if UNIT_POS_Y == 0 {
        let mut y = 1usize;
        while y < SUM_ROW_UNITS {
            let other = (y * SUM_COLUMN_UNITS + x) * MAX_LANES;
            #[unroll]
            for k in 0..n {
                total[k] += shared[other + k];
            }
            y += 1;
        }
    }
    total
}

/// The cube's column sums written into row `CUBE_POS_Y` of `partial` (`[parts, cols]`
/// contiguous).
#[cube]
fn store_column_sums<N: Size>(
    acc: Vector<f32, N>,
    partial: &mut Tensor<Vector<f32, N>>,
    column: usize,
    vectors: usize,
) {
    let total = cube_column_total::<N>(acc);
    if UNIT_POS_Y == 0 && column < vectors {
        partial[CUBE_POS_Y as usize * vectors + column] = total;
    }
}

/// The cube's column sums added into `sums` (`[cols]` f32) by f32 atomics: every part's cube
/// adds into the one row, so no second stage sums the parts (in any order).
#[cube]
fn add_column_sums<N: Size>(
    acc: Vector<f32, N>,
    sums: &mut Tensor<Atomic<f32>>,
    column: usize,
    vectors: usize,
) {
    let n = acc.vector_size();
    let total = cube_column_total::<N>(acc);
    if UNIT_POS_Y == 0 && column < vectors {
        #[unroll]
        for k in 0..n {
            sums[column * n + k].fetch_add(total[k]);
        }
    }
}

/// This unit's column vector of `x` `[rows, cols]`, the row's vector count, and the rows it
/// adds up: from its first row of the cube's part to the part's end, [`SUM_ROW_UNITS`] apart
/// (none where the column is past the row's end).
#[cube]
fn unit_part<E: Float, N: Size>(
    x: &Tensor<Vector<E, N>>,
    rows_per_part: u32,
) -> (usize, usize, usize, usize) {
    let vectors = x.shape(1) / x.vector_size();
    let column = CUBE_POS_X as usize * SUM_COLUMN_UNITS + UNIT_POS_X as usize;
    let start = CUBE_POS_Y as usize * rows_per_part as usize;
    let mut end = min(start + rows_per_part as usize, x.shape(0));
    if column >= vectors {
        end = 0;
    }
    (column, vectors, start + UNIT_POS_Y as usize, end)
}

/// This unit's sum, in f32, of its column vector of `x` over its rows of the cube's part.
#[cube]
fn column_acc<E: Float, N: Size>(
    x: &Tensor<Vector<E, N>>,
    first: usize,
    end: usize,
    column: usize,
) -> Vector<f32, N> {
    let n = x.vector_size();
    let mut acc = Vector::<f32, N>::new(0.0);
    let mut r = first;
    while r < end {
        acc += Vector::<f32, N>::cast_from(x[r * x.stride(0) / n + column]);
        r += SUM_ROW_UNITS;
    }
    acc
}

/// As [`column_acc`], of RMSNorm's weight-gradient terms `grad * normed`, with
/// `normed = x * rstd` rounded to the activations' dtype and the product taken in it, as
/// [`super::rms_norm_weight_grad`] has them.
#[cube]
fn norm_weight_acc<E: Float, N: Size>(
    grad: &Tensor<Vector<E, N>>,
    x: &Tensor<Vector<E, N>>,
    rstd: &Tensor<f32>,
    first: usize,
    end: usize,
    column: usize,
) -> Vector<f32, N> {
    let n = x.vector_size();
    let mut acc = Vector::<f32, N>::new(0.0);
    let mut r = first;
    while r < end {
        let scale = Vector::<f32, N>::new(rstd[r * rstd.stride(0)]);
        let normed = Vector::<E, N>::cast_from(
            Vector::<f32, N>::cast_from(x[r * x.stride(0) / n + column]) * scale,
        );
        acc += Vector::<f32, N>::cast_from(grad[r * grad.stride(0) / n + column] * normed);
        r += SUM_ROW_UNITS;
    }
    acc
}

/// Column sums of `x` `[rows, cols]` in f32 over each part of `rows_per_part` rows: a cube
/// takes [`SUM_COLUMN_UNITS`] vectors of columns of one part, its units stepping through the
/// part's rows [`SUM_ROW_UNITS`] apart.
#[cube(launch)]
fn column_sums_kernel<E: Float, N: Size>(
    x: &Tensor<Vector<E, N>>,
    partial: &mut Tensor<Vector<f32, N>>,
    rows_per_part: u32,
    #[define(E)] _dtype: StorageType,
) {
    let (column, vectors, first, end) = unit_part::<E, N>(x, rows_per_part);
    let acc = column_acc::<E, N>(x, first, end, column);
    store_column_sums(acc, partial, column, vectors);
}

/// As [`column_sums_kernel`], every part added into one row of sums by f32 atomics.
#[cube(launch)]
fn column_sums_atomic_kernel<E: Float, N: Size>(
    x: &Tensor<Vector<E, N>>,
    sums: &mut Tensor<Atomic<f32>>,
    rows_per_part: u32,
    #[define(E)] _dtype: StorageType,
) {
    let (column, vectors, first, end) = unit_part::<E, N>(x, rows_per_part);
    let acc = column_acc::<E, N>(x, first, end, column);
    add_column_sums(acc, sums, column, vectors);
}

/// As [`column_sums_kernel`], of RMSNorm's weight-gradient terms ([`norm_weight_acc`]).
#[cube(launch)]
fn norm_weight_sums_kernel<E: Float, N: Size>(
    grad: &Tensor<Vector<E, N>>,
    x: &Tensor<Vector<E, N>>,
    rstd: &Tensor<f32>,
    partial: &mut Tensor<Vector<f32, N>>,
    rows_per_part: u32,
    #[define(E)] _dtype: StorageType,
) {
    let (column, vectors, first, end) = unit_part::<E, N>(x, rows_per_part);
    let acc = norm_weight_acc::<E, N>(grad, x, rstd, first, end, column);
    store_column_sums(acc, partial, column, vectors);
}

/// As [`norm_weight_sums_kernel`], every part added into one row of sums by f32 atomics.
#[cube(launch)]
fn norm_weight_sums_atomic_kernel<E: Float, N: Size>(
    grad: &Tensor<Vector<E, N>>,
    x: &Tensor<Vector<E, N>>,
    rstd: &Tensor<f32>,
    sums: &mut Tensor<Atomic<f32>>,
    rows_per_part: u32,
    #[define(E)] _dtype: StorageType,
) {
    let (column, vectors, first, end) = unit_part::<E, N>(x, rows_per_part);
    let acc = norm_weight_acc::<E, N>(grad, x, rstd, first, end, column);
    add_column_sums(acc, sums, column, vectors);
}

/// Column sums of `x` `[rows, cols]` (or, given `norm = (x, rstd)`, of RMSNorm's
/// weight-gradient terms of `grad = x` here and those), as `[parts, cols]` f32: the parts'
/// sum is the whole sum. Parts are chosen so that the grid has about [`SUM_CUBES`] cubes (at
/// most [`SUM_ATOMIC_PARTS`] parts where they add atomically), each part at least
/// [`SUM_MIN_PART_ROWS`] rows. Where the runtime adds f32 atomically (CUDA), the
/// parts' cubes add into one row of zeros, the whole sum: one kernel (and the zeros' fill)
/// instead of a second stage, which for a few hundred columns is a kernel of its own each time
/// (about 10 us on the H200 against 2 for the fill).
pub fn column_sums<R: CubeRuntime>(
    x: CubeTensor<R>,
    norm: Option<(CubeTensor<R>, CubeTensor<R>)>,
) -> CubeTensor<R> {
    let dims = x.meta.shape().as_slice().to_vec();
    let [rows, cols] = dims[..] else {
        panic!("column sums: x must be [rows, cols], not {dims:?}")
    };
    let x = unit_last_stride(x);
    let norm = norm.map(|(normed_x, rstd)| {
        assert_eq!(
            normed_x.meta.shape().as_slice(),
            &dims[..],
            "column sums: RMSNorm's x does not match the gradient"
        );
        assert_eq!(
            rstd.meta.shape().as_slice(),
            &[rows, 1],
            "column sums: rstd"
        );
        (unit_last_stride(normed_x), rstd)
    });
    let vector_size = match &norm {
        Some((normed_x, _)) => vector_size(&[&x, normed_x], cols),
        None => vector_size(&[&x], cols),
    };
    let column_cubes = (cols / vector_size).div_ceil(SUM_COLUMN_UNITS);
    let atomic = adds_f32_atomically(&x.client);
    let mut parts = SUM_CUBES.div_ceil(column_cubes).clamp(1, rows.max(1));
    if atomic {
        parts = parts.min(SUM_ATOMIC_PARTS);
    }
    let rows_per_part = rows.div_ceil(parts).max(SUM_MIN_PART_ROWS);
    let parts = rows.div_ceil(rows_per_part).max(1);
    let out_rows = if atomic { 1 } else { parts };
    let zeros = || {
        burn_cubecl::ops::numeric::zeros_client(
            x.client.clone(),
            x.device.clone(),
            Shape::new([out_rows, cols]),
            DType::F32,
        )
    };
    if rows == 0 || cols == 0 {
        return zeros();
    }
    let out = if atomic {
        zeros()
    } else {
        // Every entry is written: each cube's row units cover its part's rows.
        empty_device_contiguous_dtype(
            x.client.clone(),
            x.device.clone(),
            Shape::new([parts, cols]),
            DType::F32,
        )
    };
    let client = x.client.clone();
    let count = CubeCount::Static(column_cubes as u32, parts as u32, 1);
    let cube_dim = CubeDim::new_2d(SUM_COLUMN_UNITS as u32, SUM_ROW_UNITS as u32);
    let dtype = x.dtype.into();
    let rows_per_part = u32::try_from(rows_per_part).expect("rows fit in u32");
    let (x, out_arg) = (x.into_tensor_arg(), out.clone().into_tensor_arg());
    match (norm, atomic) {
        (None, false) => column_sums_kernel::launch::<R>(
            &client,
            count,
            cube_dim,
            vector_size,
            x,
            out_arg,
            rows_per_part,
            dtype,
        ),
        (None, true) => column_sums_atomic_kernel::launch::<R>(
            &client,
            count,
            cube_dim,
            vector_size,
            x,
            out_arg,
            rows_per_part,
            dtype,
        ),
        (Some((normed_x, rstd)), false) => norm_weight_sums_kernel::launch::<R>(
            &client,
            count,
            cube_dim,
            vector_size,
            x,
            normed_x.into_tensor_arg(),
            rstd.into_tensor_arg(),
            out_arg,
            rows_per_part,
            dtype,
        ),
        (Some((normed_x, rstd)), true) => norm_weight_sums_atomic_kernel::launch::<R>(
            &client,
            count,
            cube_dim,
            vector_size,
            x,
            normed_x.into_tensor_arg(),
            rstd.into_tensor_arg(),
            out_arg,
            rows_per_part,
            dtype,
        ),
    }
    out
}

/// Whether the runtime of `client` adds f32 atomically (CUDA does; wgpu does not).
fn adds_f32_atomically<R: CubeRuntime>(client: &ComputeClient<R>) -> bool {
    client
        .properties()
        .atomic_type_usage(Type::new(StorageType::Atomic(FloatKind::F32.into())))
        .contains(AtomicUsage::Add)
}

/// `out[ids[r], c] += grad[r, c]` for every element of `grad` (a unit each), on f32 atomics
/// where the runtime adds f32 atomically (CUDA).
#[cube(launch)]
fn embedding_backward_kernel<E: Float, I: Int>(
    grad: &Tensor<E>,
    ids: &Tensor<I>,
    out: &mut Tensor<Atomic<f32>>,
    #[define(E, I)] _dtypes: [StorageType; 2],
) {
    let cols = grad.shape(1);
    if ABSOLUTE_POS >= grad.shape(0) * cols {
        terminate!();
    }
    let (at, value) = embedding_term::<E, I>(grad, ids, out.stride(0), cols);
    out[at].fetch_add(value);
}

/// As [`embedding_backward_kernel`], the f32 sums kept as their bits in u32 atomics and added
/// by compare-and-swap, for runtimes without f32 atomic addition (wgpu).
#[cube(launch)]
fn embedding_backward_cas_kernel<E: Float, I: Int>(
    grad: &Tensor<E>,
    ids: &Tensor<I>,
    out: &mut Tensor<Atomic<u32>>,
    #[define(E, I)] _dtypes: [StorageType; 2],
) {
    let cols = grad.shape(1);
    if ABSOLUTE_POS >= grad.shape(0) * cols {
        terminate!();
    }
    let (at, value) = embedding_term::<E, I>(grad, ids, out.stride(0), cols);
    let mut seen = out[at].load();
    loop {
        let expected = seen;
        let sum = f32::from_bits(expected) + value;
        seen = out[at].compare_exchange_weak(expected, sum.to_bits());
        if seen == expected {
            break;
        }
    }
}

/// This unit's element of `grad`: where it goes in the `[vocab, hidden]` output (row pitch
/// `out_stride`) and its value in f32.
#[cube]
fn embedding_term<E: Float, I: Int>(
    grad: &Tensor<E>,
    ids: &Tensor<I>,
    out_stride: usize,
    cols: usize,
) -> (usize, f32) {
    let r = ABSOLUTE_POS / cols;
    let c = ABSOLUTE_POS % cols;
    let row = usize::cast_from(ids[r * ids.stride(0)]);
    let value = f32::cast_from(grad[r * grad.stride(0) + c * grad.stride(1)]);
    (row * out_stride + c, value)
}

/// Whether the embedding's gradient can be added into `acc` in place: f32, `[vocab, hidden]`,
/// contiguous and held nowhere else.
pub fn embedding_adds_into<R: CubeRuntime>(
    acc: &CubeTensor<R>,
    [vocab, hidden]: [usize; 2],
) -> bool {
    acc.dtype == DType::F32
        && acc.meta.shape().as_slice() == [vocab, hidden]
        && acc.is_contiguous()
        && acc.can_mut()
}

/// The gradient of an embedding lookup, `[vocab, hidden]` f32: zeros, or `start` (the table's
/// gradient so far, a tied lm_head's, that [`embedding_adds_into`] passes), then each row of
/// `grad` added into its id's row atomically (rows of one token add in any order).
pub fn embedding_backward<R: CubeRuntime>(
    grad: CubeTensor<R>,
    ids: CubeTensor<R>,
    vocab: usize,
    start: Option<CubeTensor<R>>,
) -> CubeTensor<R> {
    let dims = grad.meta.shape().as_slice().to_vec();
    let [rows, hidden] = dims[..] else {
        panic!("embedding_backward: grad must be [n, hidden], not {dims:?}")
    };
    let out = match start {
        Some(start) => {
            assert!(
                embedding_adds_into(&start, [vocab, hidden]),
                "embedding_backward: the start cannot be added into in place"
            );
            start
        }
        None => burn_cubecl::ops::numeric::zeros_client(
            grad.client.clone(),
            grad.device.clone(),
            Shape::new([vocab, hidden]),
            DType::F32,
        ),
    };
    scatter_rows(grad, ids, out, [rows, hidden])
}

/// Each row of `grad` `[rows, hidden]` added into its id's row of `out` (f32) atomically.
fn scatter_rows<R: CubeRuntime>(
    grad: CubeTensor<R>,
    ids: CubeTensor<R>,
    out: CubeTensor<R>,
    [rows, hidden]: [usize; 2],
) -> CubeTensor<R> {
    if rows * hidden == 0 {
        return out;
    }
    let client = grad.client.clone();
    let cube_dim = CubeDim::new_1d(CUBE_SIZE as u32);
    let count = cubecl::calculate_cube_count_elemwise(&client, rows * hidden, cube_dim);
    let dtypes = [grad.dtype.into(), ids.dtype.into()];
    let native = adds_f32_atomically(&client);
    let (grad_arg, ids_arg, out_arg) = (
        grad.into_tensor_arg(),
        ids.into_tensor_arg(),
        out.clone().into_tensor_arg(),
    );
    if native {
        embedding_backward_kernel::launch::<R>(
            &client, count, cube_dim, grad_arg, ids_arg, out_arg, dtypes,
        );
    } else {
        embedding_backward_cas_kernel::launch::<R>(
            &client, count, cube_dim, grad_arg, ids_arg, out_arg, dtypes,
        );
    }
    out
}
