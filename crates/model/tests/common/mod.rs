//! Shared helpers of the model tests.
#![allow(dead_code)]

use std::path::PathBuf;

use burn::tensor::{Int, Tensor, TensorData};
use safetensors::SafeTensors;

/// The CPU backend the tests run on.
pub type B = burn::backend::Flex;
pub type AB = burn::backend::Autodiff<B>;

pub fn device() -> burn::backend::flex::FlexDevice {
    Default::default()
}

pub fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/model")
        .join(name)
}

/// The tensors of a `reference.safetensors`, as host data.
pub struct Reference {
    bytes: Vec<u8>,
}

impl Reference {
    pub fn open(variant: &str) -> Self {
        let path = fixture_dir(variant).join("reference.safetensors");
        Self {
            bytes: std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
        }
    }

    fn view(&self, name: &str) -> (Vec<usize>, safetensors::Dtype, Vec<u8>) {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let view = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("no `{name}` in the reference"));
        (view.shape().to_vec(), view.dtype(), view.data().to_vec())
    }

    pub fn i64s(&self, name: &str) -> (Vec<usize>, Vec<i64>) {
        let (shape, dtype, data) = self.view(name);
        assert_eq!(dtype, safetensors::Dtype::I64, "{name}");
        let values = data
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        (shape, values)
    }

    pub fn f32s(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        let (shape, dtype, data) = self.view(name);
        assert_eq!(dtype, safetensors::Dtype::F32, "{name}");
        let values = data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        (shape, values)
    }

    pub fn int_tensor<const D: usize>(&self, name: &str) -> Tensor<B, D, Int> {
        let (shape, values) = self.i64s(name);
        Tensor::from_data(TensorData::new(values, shape), &device())
    }
}

/// Largest absolute difference, with a NaN counting as infinitely far.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            if x.is_nan() || y.is_nan() {
                f32::INFINITY
            } else {
                (x - y).abs()
            }
        })
        .fold(0.0, f32::max)
}
