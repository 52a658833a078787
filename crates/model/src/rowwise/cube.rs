//! The rotary embedding as one CubeCL kernel each way, RMSNorm's forward and the gradient of
//! its input as one kernel each, and the token embedding's gradient as one kernel.
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
//! own (docs/BENCHMARKS.md, "Kernel launches per training step"). Here a unit takes one pair
//! `(i, i + half)` of one row, reads `x` through its strides (the model hands in a
//! `swap_dims` view) and the tables through theirs, and writes both results, computing in f32
//! with each product rounded to the activations' dtype, as the tensor ops round it:
//!
//! ```text
//! forward:  y1 = x1 c1 - x2 s1,  y2 = x2 c2 + x1 s2      (x c + rotate_half(x) s)
//! backward: y1 = x1 c1 + x2 s2,  y2 = x2 c2 - x1 s1      (dy c - rotate_half(dy s))
//! ```

use burn::tensor::{DType, Shape};
use burn_cubecl::CubeRuntime;
use burn_cubecl::cubecl;
use burn_cubecl::cubecl::features::AtomicUsage;
use burn_cubecl::cubecl::ir::FloatKind;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;

use crate::attention::cube::{CUBE_SIZE, cube_count, reduce_cube, row_id};

/// `v` rounded to `E` and back: a no-op for f32. A product of two values of `E` (bf16, f16) is
/// exact in f32, so this is the product that a multiplication in `E` returns.
#[cube]
fn in_dtype<E: Float>(v: f32) -> f32 {
    f32::cast_from(E::cast_from(v))
}

/// `x`: `[batch, heads, seq, head_dim]`; `cos`, `sin`: `[batch or 1, 1, seq, head_dim]`;
/// `out`: `[batch, seq, heads, head_dim]`, contiguous.
#[cube(launch)]
fn rotary_kernel<E: Float>(
    x: &Tensor<E>,
    cos: &Tensor<E>,
    sin: &Tensor<E>,
    out: &mut Tensor<E>,
    #[comptime] backward: bool,
    #[define(E)] _dtype: StorageType,
) {
    let heads = x.shape(1);
    let seq = x.shape(2);
    let half = x.shape(3) / 2;
    let id = ABSOLUTE_POS;
    if id >= x.shape(0) * heads * seq * half {
        terminate!();
    }
    let i = id % half;
    let s = (id / half) % seq;
    let h = (id / (half * seq)) % heads;
    let b = id / (half * seq * heads);

    let row = b * x.stride(0) + h * x.stride(1) + s * x.stride(2);
    let x1 = f32::cast_from(x[row + i * x.stride(3)]);
    let x2 = f32::cast_from(x[row + (i + half) * x.stride(3)]);
    // The tables have one head, and one batch row when every row shares the positions.
    let mut tb = b;
    if cos.shape(0) == 1 {
        tb = 0;
    }
    let c = tb * cos.stride(0) + s * cos.stride(2);
    let c1 = f32::cast_from(cos[c + i * cos.stride(3)]);
    let c2 = f32::cast_from(cos[c + (i + half) * cos.stride(3)]);
    let t = tb * sin.stride(0) + s * sin.stride(2);
    let s1 = f32::cast_from(sin[t + i * sin.stride(3)]);
    let s2 = f32::cast_from(sin[t + (i + half) * sin.stride(3)]);

    // Each product rounded to E before the sum, as the tensor ops (one op each) round them, so
    // that bf16 gives the reference's values and not merely closer ones.
    let mut y1 = in_dtype::<E>(x1 * c1) - in_dtype::<E>(x2 * s1);
    let mut y2 = in_dtype::<E>(x2 * c2) + in_dtype::<E>(x1 * s2);
    if comptime!(backward) {
        y1 = in_dtype::<E>(x1 * c1) + in_dtype::<E>(x2 * s2);
        y2 = in_dtype::<E>(x2 * c2) - in_dtype::<E>(x1 * s1);
    }
    // `out` is [batch, seq, heads, head_dim] in memory (see `rotary`).
    let o = ((b * seq + s) * heads + h) * 2 * half;
    out[o + i] = E::cast_from(y1);
    out[o + i + half] = E::cast_from(y2);
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
    // Written as [batch, seq, heads, head_dim] and given back as a [batch, heads, seq,
    // head_dim] view of it: the layout the projections use, so that the model's swap back
    // (the gradient of q and k on its way to their projections) costs no copy.
    let out = empty_device_contiguous_dtype(
        x.client.clone(),
        x.device.clone(),
        Shape::new([batch, seq, dims[1], head_dim]),
        x.dtype,
    );
    let pairs = dims.iter().product::<usize>() / 2;
    let client = x.client.clone();
    let cube_dim = CubeDim::new_1d(CUBE_SIZE as u32);
    let dtype = x.dtype.into();
    rotary_kernel::launch::<R>(
        &client,
        cubecl::calculate_cube_count_elemwise(&client, pairs, cube_dim),
        cube_dim,
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

/// RMSNorm of one row per cube: `x` `[rows, hidden]` (any strides), `weight` `[hidden]`; writes
/// `y` `[rows, hidden]` (contiguous) and `rstd` `[rows]`. The arithmetic of
/// [`super::rms_norm_forward`]: the squares summed and the rows scaled in f32, the normalised
/// row rounded to the activations' dtype, then multiplied by the weight in that dtype.
#[cube(launch)]
fn rms_norm_forward_kernel<E: Float>(
    x: &Tensor<E>,
    weight: &Tensor<E>,
    y: &mut Tensor<E>,
    rstd: &mut Tensor<f32>,
    eps: f32,
    #[define(E)] _dtype: StorageType,
) {
    let row = row_id();
    if row >= x.shape(0) {
        terminate!();
    }
    let hidden = x.shape(1);
    let base = row * x.stride(0);
    let mut local = 0.0f32;
    let mut j = UNIT_POS_X as usize;
    while j < hidden {
        let v = f32::cast_from(x[base + j * x.stride(1)]);
        local += v * v;
        j += CUBE_DIM_X as usize;
    }
    let sum = reduce_cube(local, false);
    let r = 1.0f32 / (sum / f32::cast_from(hidden) + eps).sqrt();
    let mut j = UNIT_POS_X as usize;
    while j < hidden {
        let normed = E::cast_from(f32::cast_from(x[base + j * x.stride(1)]) * r);
        y[row * hidden + j] = normed * weight[j * weight.stride(0)];
        j += CUBE_DIM_X as usize;
    }
    if UNIT_POS_X == 0 {
        rstd[row] = r;
    }
}

/// The gradient of RMSNorm with respect to `x`, one row per cube (`x`, `grad` `[rows, hidden]`,
/// `rstd` `[rows]` f32, `weight` `[hidden]`; `dx` contiguous), as
/// [`super::rms_norm_backward`]: `g = (dy * w)` in the activations' dtype, then in f32
/// `dx = rstd * (g - n * mean(g * n))` with `n = x * rstd`.
#[cube(launch)]
fn rms_norm_backward_kernel<E: Float>(
    x: &Tensor<E>,
    rstd: &Tensor<f32>,
    weight: &Tensor<E>,
    grad: &Tensor<E>,
    dx: &mut Tensor<E>,
    #[define(E)] _dtype: StorageType,
) {
    let row = row_id();
    if row >= x.shape(0) {
        terminate!();
    }
    let hidden = x.shape(1);
    let r = rstd[row * rstd.stride(0)];
    let xb = row * x.stride(0);
    let gb = row * grad.stride(0);
    let mut local = 0.0f32;
    let mut j = UNIT_POS_X as usize;
    while j < hidden {
        let g = f32::cast_from(grad[gb + j * grad.stride(1)] * weight[j * weight.stride(0)]);
        local += g * (f32::cast_from(x[xb + j * x.stride(1)]) * r);
        j += CUBE_DIM_X as usize;
    }
    let dot = reduce_cube(local, false) / f32::cast_from(hidden);
    let mut j = UNIT_POS_X as usize;
    while j < hidden {
        let g = f32::cast_from(grad[gb + j * grad.stride(1)] * weight[j * weight.stride(0)]);
        let n = f32::cast_from(x[xb + j * x.stride(1)]) * r;
        dx[row * hidden + j] = E::cast_from((g - n * dot) * r);
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

/// RMSNorm forward: `y` in `x`'s dtype and `rstd` `[rows, 1]` f32; see
/// [`super::rms_norm_forward`].
pub fn rms_norm_forward<R: CubeRuntime>(
    x: CubeTensor<R>,
    weight: CubeTensor<R>,
    eps: f64,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let [rows, hidden] = check_rows("rms_norm", &x, &weight);
    let empty = |shape: [usize; 2], dtype| {
        empty_device_contiguous_dtype(x.client.clone(), x.device.clone(), Shape::new(shape), dtype)
    };
    let y = empty([rows, hidden], x.dtype);
    let rstd = empty([rows, 1], DType::F32);
    let client = x.client.clone();
    let dtype = x.dtype.into();
    rms_norm_forward_kernel::launch::<R>(
        &client,
        cube_count(rows),
        CubeDim::new_1d(CUBE_SIZE as u32),
        x.into_tensor_arg(),
        weight.into_tensor_arg(),
        y.clone().into_tensor_arg(),
        rstd.clone().into_tensor_arg(),
        eps as f32,
        dtype,
    );
    (y, rstd)
}

/// The gradient of RMSNorm with respect to `x`; see [`super::rms_norm_backward`].
pub fn rms_norm_backward_x<R: CubeRuntime>(
    x: CubeTensor<R>,
    rstd: CubeTensor<R>,
    weight: CubeTensor<R>,
    grad: CubeTensor<R>,
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
    let dx = empty_device_contiguous_dtype(
        x.client.clone(),
        x.device.clone(),
        Shape::new([rows, hidden]),
        x.dtype,
    );
    let client = x.client.clone();
    let dtype = x.dtype.into();
    rms_norm_backward_kernel::launch::<R>(
        &client,
        cube_count(rows),
        CubeDim::new_1d(CUBE_SIZE as u32),
        x.into_tensor_arg(),
        rstd.into_tensor_arg(),
        weight.into_tensor_arg(),
        grad.into_tensor_arg(),
        dx.clone().into_tensor_arg(),
        dtype,
    );
    dx
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

/// The gradient of an embedding lookup, `[vocab, hidden]` f32: zeros, then each row of `grad`
/// added into its id's row atomically (rows of one token add in any order).
pub fn embedding_backward<R: CubeRuntime>(
    grad: CubeTensor<R>,
    ids: CubeTensor<R>,
    vocab: usize,
) -> CubeTensor<R> {
    let dims = grad.meta.shape().as_slice().to_vec();
    let [rows, hidden] = dims[..] else {
        panic!("embedding_backward: grad must be [n, hidden], not {dims:?}")
    };
    let out = burn_cubecl::ops::numeric::zeros_client(
        grad.client.clone(),
        grad.device.clone(),
        Shape::new([vocab, hidden]),
        DType::F32,
    );
    if rows * hidden == 0 {
        return out;
    }
    let client = grad.client.clone();
    let cube_dim = CubeDim::new_1d(CUBE_SIZE as u32);
    let count = cubecl::calculate_cube_count_elemwise(&client, rows * hidden, cube_dim);
    let dtypes = [grad.dtype.into(), ids.dtype.into()];
    let native = client
        .properties()
        .atomic_type_usage(Type::new(StorageType::Atomic(FloatKind::F32.into())))
        .contains(AtomicUsage::Add);
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
