//! Where parameters come from while a model is built.
//!
//! The model is built candle-style: each layer asks for its tensors by their Hugging Face name
//! where the layer is constructed (`weights.pp("q_proj").linear(...)`), so the checkpoint name of
//! a parameter is written exactly once. A [`WeightSource`] answers: [`RandomInit`] draws fresh
//! values, `CheckpointSource` (in `checkpoint.rs`) reads safetensors.

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::error::LoadError;

/// How a fresh parameter is initialised, as transformers' `_init_weights` does for Qwen2.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// Normal with mean 0 and the config's `initializer_range` as standard deviation.
    Normal,
    Zeros,
    Ones,
}

/// Supplies the tensor of one named parameter.
pub trait WeightSource {
    /// The tensor called `name`, of shape `shape`, as host data in any float dtype.
    fn tensor(&mut self, name: &str, shape: &[usize], init: Init) -> Result<TensorData, LoadError>;
}

/// Fresh parameters from a seeded generator. The values depend only on the seed and the order
/// in which parameters are asked for, never on the backend, so every backend starts from the
/// same model.
pub struct RandomInit {
    rng: SmallRng,
    std: f64,
}

impl RandomInit {
    pub fn new(seed: u64, std: f64) -> Self {
        Self {
            rng: SmallRng::seed_from_u64(seed),
            std,
        }
    }

    /// A standard normal sample (Box-Muller; `rand` alone has no normal distribution).
    fn standard_normal(&mut self) -> f32 {
        let u1: f64 = 1.0 - self.rng.random::<f64>();
        let u2: f64 = self.rng.random::<f64>();
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }
}

impl WeightSource for RandomInit {
    fn tensor(
        &mut self,
        _name: &str,
        shape: &[usize],
        init: Init,
    ) -> Result<TensorData, LoadError> {
        let n = shape.iter().product();
        let values: Vec<f32> = match init {
            Init::Zeros => vec![0.0; n],
            Init::Ones => vec![1.0; n],
            Init::Normal => {
                let std = self.std as f32;
                (0..n).map(|_| self.standard_normal() * std).collect()
            }
        };
        Ok(TensorData::new(values, shape.to_vec()))
    }
}

/// A cursor into a [`WeightSource`] at one module path, like candle's `VarBuilder`.
pub struct Weights<'a, B: Backend> {
    source: &'a mut dyn WeightSource,
    prefix: String,
    device: B::Device,
    dtype: DType,
}

impl<'a, B: Backend> Weights<'a, B> {
    /// Parameters are created on `device` in `dtype` (the master-weight dtype, normally F32).
    pub fn new(source: &'a mut dyn WeightSource, device: &B::Device, dtype: DType) -> Self {
        Self {
            source,
            prefix: String::new(),
            device: device.clone(),
            dtype,
        }
    }

    /// The same source, one path component deeper: `pp("layers").pp(3)` is `layers.3.`.
    pub fn pp(&mut self, name: impl std::fmt::Display) -> Weights<'_, B> {
        Weights {
            source: &mut *self.source,
            prefix: format!("{}{name}.", self.prefix),
            device: self.device.clone(),
            dtype: self.dtype,
        }
    }

    /// The full name of parameter `name` under this path.
    pub fn name(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// The trainable parameter `name` of shape `shape`.
    pub fn param<const D: usize>(
        &mut self,
        name: &str,
        shape: [usize; D],
        init: Init,
    ) -> Result<Param<Tensor<B, D>>, LoadError> {
        let full_name = self.name(name);
        let data = self.source.tensor(&full_name, &shape, init)?;
        debug_assert_eq!(data.shape.as_slice(), shape.as_slice(), "{full_name}");
        let tensor = Tensor::from_data(data.convert_dtype(self.dtype), &self.device);
        Ok(Param::from_tensor(tensor))
    }
}
