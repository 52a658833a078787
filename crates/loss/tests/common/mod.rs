//! Helpers shared by the integration tests: backends, fixture loading, comparisons.

#![allow(dead_code)]

use std::path::PathBuf;

use burn::tensor::{Int, Tensor, TensorData, backend::Backend};

/// The plain CPU backend.
pub type Cpu = burn::backend::Flex;
/// The CPU backend with autodiff.
pub type Ad = burn::backend::Autodiff<Cpu>;

pub fn device() -> burn::backend::flex::FlexDevice {
    Default::default()
}

/// `tests/fixtures/loss/` at the workspace root.
pub fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/loss")
}

/// The tensors of one safetensors fixture, by name.
pub struct Fixture {
    bytes: Vec<u8>,
}

impl Fixture {
    pub fn load(name: &str) -> Self {
        let path = fixture_dir().join(name);
        let bytes = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("reading fixture {}: {e}", path.display()));
        Self { bytes }
    }

    fn view(&self, name: &str) -> (safetensors::Dtype, Vec<usize>, Vec<u8>) {
        let st = safetensors::SafeTensors::deserialize(&self.bytes).expect("valid safetensors");
        let view = st
            .tensor(name)
            .unwrap_or_else(|e| panic!("fixture tensor {name}: {e}"));
        (view.dtype(), view.shape().to_vec(), view.data().to_vec())
    }

    pub fn shape(&self, name: &str) -> Vec<usize> {
        self.view(name).1
    }

    pub fn f64s(&self, name: &str) -> Vec<f64> {
        let (dtype, _, data) = self.view(name);
        assert_eq!(dtype, safetensors::Dtype::F64, "{name}");
        data.chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }

    pub fn f32s(&self, name: &str) -> Vec<f32> {
        let (dtype, _, data) = self.view(name);
        assert_eq!(dtype, safetensors::Dtype::F32, "{name}");
        data.chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }

    pub fn i64s(&self, name: &str) -> Vec<i64> {
        let (dtype, _, data) = self.view(name);
        assert_eq!(dtype, safetensors::Dtype::I64, "{name}");
        data.chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }

    pub fn float<B: Backend, const D: usize>(
        &self,
        name: &str,
        device: &B::Device,
    ) -> Tensor<B, D> {
        let shape = self.shape(name);
        Tensor::from_data(TensorData::new(self.f32s(name), shape), device)
    }

    pub fn int<B: Backend, const D: usize>(
        &self,
        name: &str,
        device: &B::Device,
    ) -> Tensor<B, D, Int> {
        let shape = self.shape(name);
        Tensor::from_data(TensorData::new(self.i64s(name), shape), device)
    }
}

pub fn to_f32<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("f32 data")
}

pub fn to_i64<B: Backend, const D: usize>(t: Tensor<B, D, Int>) -> Vec<i64> {
    t.into_data().iter::<i64>().collect()
}

/// The largest absolute and relative differences seen by [`assert_close`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Diff {
    pub max_abs: f64,
    pub max_rel: f64,
    pub max_norm_rel: f64,
}

/// Asserts `|a - e| <= abs + rel * |e|` element-wise, prints and returns the max differences.
pub fn assert_close(what: &str, actual: &[f32], expected: &[f64], rel: f64, abs: f64) -> Diff {
    assert_eq!(actual.len(), expected.len(), "{what}: lengths differ");
    let mut diff = Diff::default();
    let scale = expected.iter().fold(0.0f64, |m, e| m.max(e.abs()));
    for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        let a = a as f64;
        assert!(a.is_finite(), "{what}[{i}] = {a} is not finite");
        let d = (a - e).abs();
        diff.max_abs = diff.max_abs.max(d);
        if e.abs() > abs {
            diff.max_rel = diff.max_rel.max(d / e.abs());
        }
        assert!(
            d <= abs + rel * e.abs(),
            "{what}[{i}]: got {a}, expected {e} (diff {d:e}, allowed {:e})",
            abs + rel * e.abs()
        );
    }
    diff.max_norm_rel = if scale > 0.0 {
        diff.max_abs / scale
    } else {
        0.0
    };
    eprintln!(
        "{what}: max abs diff {:.3e}, max elementwise rel {:.3e}, max abs / max |expected| {:.3e} over {} values",
        diff.max_abs,
        diff.max_rel,
        diff.max_norm_rel,
        expected.len()
    );
    diff
}

/// [`assert_close`] between two f32 results, the second taken as the reference.
pub fn assert_close_f32(what: &str, actual: &[f32], expected: &[f32], rel: f64, abs: f64) -> Diff {
    let expected: Vec<f64> = expected.iter().map(|&e| e as f64).collect();
    assert_close(what, actual, &expected, rel, abs)
}
