//! `ChunkedCeBackend` for the plain backends: the default (tensor-op) kernels, except for the
//! element-wise work of a tile on CubeCL backends where [`loss_kernels`](super::loss_kernels)
//! says so (`chunked::cube`).
//!
//! A blanket `impl<B: Backend>` would overlap the one for `Autodiff<B, C>`, so each backend
//! family gets its own impl behind a feature of this crate.

#[cfg(feature = "flex")]
impl super::ChunkedCeBackend for burn::backend::Flex {}

#[cfg(feature = "cubecl")]
mod cube {
    use burn::tensor::backend::Backend;
    use burn_cubecl::tensor::CubeTensor;
    use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};

    use crate::chunked::{ChunkedCeBackend, GradTile, cube, kernel, loss_kernels};

    impl<R, F, I, BT> ChunkedCeBackend for CubeBackend<R, F, I, BT>
    where
        R: CubeRuntime,
        F: FloatElement,
        I: IntElement,
        BT: BoolElement,
        Self: Backend<FloatTensorPrimitive = CubeTensor<R>, IntTensorPrimitive = CubeTensor<R>>,
    {
        fn logit_row_stats(
            logits: CubeTensor<R>,
            targets: CubeTensor<R>,
            with_mean: bool,
        ) -> CubeTensor<R> {
            if !Self::loss_kernels_run() {
                return kernel::logit_row_stats::<Self>(logits, targets, with_mean);
            }
            cube::row_stats(logits, targets)
        }

        fn logits_grad(
            logits: CubeTensor<R>,
            lse: CubeTensor<R>,
            p_scale: CubeTensor<R>,
            g: CubeTensor<R>,
            targets: CubeTensor<R>,
            tile: GradTile,
        ) -> CubeTensor<R> {
            if !Self::loss_kernels_run() {
                return kernel::logits_grad::<Self>(logits, lse, p_scale, g, targets, tile);
            }
            cube::logits_grad(logits, lse, p_scale, g, targets, tile)
        }

        fn loss_kernels_run() -> bool {
            loss_kernels().runs_kernels(qwen_gemm::is_cuda::<R>())
        }
    }
}

/// Under fusion, where the inner backend runs the loss's kernels, each is one custom operation
/// (fusion ends its pending fused kernels there, then calls the inner backend's method); with
/// tensor ops they stay ordinary fusion operations.
#[cfg(feature = "fusion")]
mod fusion {
    use std::marker::PhantomData;

    use burn::tensor::DType;
    use burn::tensor::ops::{FloatTensor, IntTensor};
    use burn_fusion::stream::{Operation, OperationStreams};
    use burn_fusion::{Fusion, FusionBackend, FusionRuntime};
    use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};

    use crate::chunked::{ChunkedCeBackend, GradTile, kernel};

    type Handles<B> =
        HandleContainer<<<B as FusionBackend>::FusionRuntime as FusionRuntime>::FusionHandle>;

    /// Which inner method a custom operation runs; the last input is the targets (int).
    #[derive(Clone, Copy, Debug)]
    enum Kind {
        /// `[logits, targets] -> [stats]`
        RowStats { with_mean: bool },
        /// `[logits, lse, p_scale, g, targets] -> [dlogits]`
        LogitsGrad(GradTile),
    }

    impl Kind {
        fn name(self) -> &'static str {
            match self {
                Self::RowStats { .. } => "qwen_loss::logit_row_stats",
                Self::LogitsGrad(_) => "qwen_loss::logits_grad",
            }
        }
    }

    #[derive(Clone, Debug)]
    struct LossOp<B> {
        desc: CustomOpIr,
        kind: Kind,
        _backend: PhantomData<B>,
    }

    impl<B: FusionBackend + ChunkedCeBackend> Operation<B::FusionRuntime> for LossOp<B> {
        fn execute(&self, handles: &mut Handles<B>) {
            let (targets, floats) = self.desc.inputs.split_last().expect("the op's inputs");
            let targets = handles.get_int_tensor::<B>(targets);
            let mut floats = floats.iter().map(|ir| handles.get_float_tensor::<B>(ir));
            let mut next = || floats.next().expect("the op's float inputs");
            let output = match self.kind {
                Kind::RowStats { with_mean } => B::logit_row_stats(next(), targets, with_mean),
                Kind::LogitsGrad(tile) => {
                    let (logits, lse, p_scale, g) = (next(), next(), next(), next());
                    B::logits_grad(logits, lse, p_scale, g, targets, tile)
                }
            };
            handles.register_float_tensor::<B>(&self.desc.outputs[0].id, output);
        }
    }

    /// One custom operation running `kind` on the inner backend, with one result of `shape`
    /// and `dtype`.
    fn register<B: FusionBackend + ChunkedCeBackend>(
        kind: Kind,
        inputs: Vec<FloatTensor<Fusion<B>>>,
        shape: Vec<usize>,
        dtype: DType,
    ) -> FloatTensor<Fusion<B>> {
        let client = inputs[0].client.clone();
        let streams = OperationStreams::with_inputs(&inputs);
        let output = TensorIr::uninit(client.create_empty_handle(), shape.into(), dtype);
        let inputs: Vec<_> = inputs.into_iter().map(|t| t.into_ir()).collect();
        let desc = CustomOpIr::new(kind.name(), &inputs, &[output]);
        let op = LossOp::<B> {
            desc: desc.clone(),
            kind,
            _backend: PhantomData,
        };
        let mut out = client.register(streams, OperationIr::Custom(desc), op);
        out.pop().expect("the op's result")
    }

    impl<B: FusionBackend + ChunkedCeBackend> ChunkedCeBackend for Fusion<B> {
        fn logit_row_stats(
            logits: FloatTensor<Self>,
            targets: IntTensor<Self>,
            with_mean: bool,
        ) -> FloatTensor<Self> {
            if !B::loss_kernels_run() {
                return kernel::logit_row_stats::<Self>(logits, targets, with_mean);
            }
            let rows = logits.shape.as_slice()[0];
            let kind = Kind::RowStats { with_mean };
            register::<B>(kind, vec![logits, targets], vec![rows, 3], DType::F32)
        }

        fn logits_grad(
            logits: FloatTensor<Self>,
            lse: FloatTensor<Self>,
            p_scale: FloatTensor<Self>,
            g: FloatTensor<Self>,
            targets: IntTensor<Self>,
            tile: GradTile,
        ) -> FloatTensor<Self> {
            if !B::loss_kernels_run() {
                return kernel::logits_grad::<Self>(logits, lse, p_scale, g, targets, tile);
            }
            let (shape, dtype) = (logits.shape.as_slice().to_vec(), logits.dtype);
            let inputs = vec![logits, lse, p_scale, g, targets];
            register::<B>(Kind::LogitsGrad(tile), inputs, shape, dtype)
        }

        fn loss_kernels_run() -> bool {
            B::loss_kernels_run()
        }
    }
}
