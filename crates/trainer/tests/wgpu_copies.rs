//! `qwen_gemm::copies` on a CubeCL backend (wgpu; Mesa's software Vulkan in CI): a copy kept
//! for a parameter's value stands in for that value's cast in `GemmBackend::cast_param`, on the
//! backend itself and under fusion, for the whole value and any reshape of it, and for nothing
//! else (a slice of it, other memory with equal values, a forgotten value, a cleared cache).
//!
//! The copy is made of *twice* the value, so that a result tells which one ran: the kept copy
//! or a cast. (The optimizer keeps true copies: `tests/adamw_emulated.rs` checks those.) The
//! copies here are f16: wgpu has no bf16.
//!
//! Run with `cargo test -p qwen-sft --features wgpu --test wgpu_copies`.
#![cfg(feature = "wgpu")]

use burn::backend::Wgpu;
use burn::backend::wgpu::{WgpuDevice, WgpuRuntime};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Distribution, Tensor, TensorPrimitive};
use burn_cubecl::CubeBackend;
use qwen_gemm::{GemmBackend, copies};

type Cube = CubeBackend<WgpuRuntime, f32, i32, u32>;

fn float<B: Backend, const D: usize>(t: burn::tensor::ops::FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

/// `t` to f16 through `cast_param`, as f32 values (wgpu has no bf16).
fn cast_param<B: GemmBackend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    values(float::<B, D>(B::cast_param(
        t.into_primitive().tensor(),
        DType::F16,
    )))
}

fn f16<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    values(t.cast(DType::F16))
}

#[test]
fn a_kept_copy_stands_in_for_the_cast_of_its_whole_value_only() {
    let device = WgpuDevice::default();
    // On the backend itself.
    let value = Tensor::<Cube, 2>::random([6, 10], Distribution::Default, &device);
    let doubled = value.clone().mul_scalar(2.0).cast(DType::F16);
    let copy = doubled.clone().reshape([60]).into_primitive().tensor();
    let kept = value.clone().into_primitive().tensor();
    copies::remember(&kept, copy);
    assert!(copies::any());
    assert_eq!(cast_param(value.clone()), values(doubled.clone()));
    assert_eq!(
        cast_param(value.clone().reshape([3, 20])),
        values(doubled.clone().reshape([3, 20]))
    );
    // Not a slice of it, nor other memory with the same values; in its own dtype, itself.
    let rows = value.clone().narrow(0, 1, 2);
    assert_eq!(cast_param(rows.clone()), f16(rows));
    let f32 = Cube::cast_param(value.clone().into_primitive().tensor(), DType::F32);
    assert_eq!(values(float::<Cube, 2>(f32)), values(value.clone()));
    let same_values = value.clone().add_scalar(0.0);
    assert_eq!(cast_param(same_values.clone()), f16(same_values));
    copies::forget(&kept);
    assert_eq!(cast_param(value.clone()), f16(value.clone()));
    assert_eq!(copies::count(), 0);

    // Under fusion: the cast becomes an operation that finds the copy of the value's memory.
    let value = Tensor::<Wgpu, 2>::random([4, 8], Distribution::Default, &device);
    let inner = value.clone().into_primitive().tensor();
    let inner: burn_cubecl::tensor::CubeTensor<WgpuRuntime> =
        inner.client.clone().resolve_tensor_float::<Cube>(inner);
    let doubled = Tensor::<Cube, 2>::from_data(value.clone().into_data(), &device)
        .mul_scalar(2.0)
        .cast(DType::F16);
    copies::remember(&inner, doubled.clone().into_primitive().tensor());
    assert_eq!(cast_param(value.clone()), values(doubled));
    let other = value.clone().mul_scalar(3.0);
    assert_eq!(cast_param(other.clone()), f16(other));
    copies::forget(&inner);
    assert_eq!(cast_param(value.clone()), f16(value.clone()));

    // A run's start drops whatever an earlier one kept.
    copies::remember(
        &inner,
        Tensor::<Cube, 2>::zeros([4, 8], &device)
            .cast(DType::F16)
            .into_primitive()
            .tensor(),
    );
    assert_eq!(copies::count(), 1);
    copies::clear();
    assert!(!copies::any());
    assert_eq!(cast_param(value.clone()), f16(value));
}
