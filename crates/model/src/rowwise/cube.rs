//! The rotary embedding as one CubeCL kernel each way.
//!
//! In tensor ops it is six kernels per tensor and direction: burn's fuser leaves the negation,
//! the two slice assignments of the `cat`, the two broadcast products and the sum each on its
//! own (docs/BENCHMARKS.md, "Kernel launches per training step"). Here a unit takes one pair
//! `(i, i + half)` of one row, reads `x` through its strides (the model hands in a
//! `swap_dims` view) and the tables through theirs, and writes both results, computing in f32:
//!
//! ```text
//! forward:  y1 = x1 c1 - x2 s1,  y2 = x2 c2 + x1 s2      (x c + rotate_half(x) s)
//! backward: y1 = x1 c1 + x2 s2,  y2 = x2 c2 - x1 s1      (dy c - rotate_half(dy s))
//! ```

use burn::tensor::Shape;
use burn_cubecl::CubeRuntime;
use burn_cubecl::cubecl;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;

/// Units per cube.
const CUBE_SIZE: u32 = 256;

/// `x`: `[batch, heads, seq, head_dim]`; `cos`, `sin`: `[batch or 1, 1, seq, head_dim]`;
/// `out`: like `x`, contiguous.
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

    let mut y1 = x1 * c1 - x2 * s1;
    let mut y2 = x2 * c2 + x1 * s2;
    if comptime!(backward) {
        y1 = x1 * c1 + x2 * s2;
        y2 = x2 * c2 - x1 * s1;
    }
    let o = ((b * heads + h) * seq + s) * 2 * half;
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
    let out = empty_device_contiguous_dtype(
        x.client.clone(),
        x.device.clone(),
        Shape::from(dims.clone()),
        x.dtype,
    );
    let pairs = dims.iter().product::<usize>() / 2;
    let client = x.client.clone();
    let cube_dim = CubeDim::new_1d(CUBE_SIZE);
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
    out
}
