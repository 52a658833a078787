//! `RowwiseBackend` for the plain backends, each with the default (tensor-op) bodies except for
//! RMSNorm and the rotary embedding on CubeCL backends (`rowwise::cube`). One impl per backend
//! family, as in `attention/backends.rs`.

#[cfg(feature = "flex")]
impl super::RowwiseBackend for burn::backend::Flex {}

#[cfg(feature = "ndarray")]
impl super::RowwiseBackend for burn::backend::NdArray {}

#[cfg(feature = "cubecl")]
mod cube {
    use burn::tensor::backend::Backend;
    use burn::tensor::ops::{FloatTensor, FloatTensorOps};
    use burn::tensor::{DType, Tensor, TensorPrimitive};
    use burn_cubecl::tensor::CubeTensor;
    use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};

    use crate::kernels::{Kernel, kernel_runs};
    use crate::rowwise::{RowwiseBackend, cube, tensor_ops};

    impl<R, F, I, BT> RowwiseBackend for CubeBackend<R, F, I, BT>
    where
        R: CubeRuntime,
        F: FloatElement,
        I: IntElement,
        BT: BoolElement,
        Self: Backend<FloatTensorPrimitive = CubeTensor<R>, IntTensorPrimitive = CubeTensor<R>>,
    {
        fn rms_norm_forward(
            x: CubeTensor<R>,
            weight: CubeTensor<R>,
            eps: f64,
        ) -> (CubeTensor<R>, CubeTensor<R>) {
            if !Self::rowwise_kernel_runs(Kernel::RmsNorm) {
                return tensor_ops::rms_norm_forward::<Self>(x, weight, eps);
            }
            cube::rms_norm_forward(x, weight, eps)
        }

        fn rms_norm_backward(
            x: CubeTensor<R>,
            rstd: CubeTensor<R>,
            weight: CubeTensor<R>,
            grad: CubeTensor<R>,
            request: [bool; 2],
            acc: Option<CubeTensor<R>>,
        ) -> [Option<CubeTensor<R>>; 2] {
            if !Self::rowwise_kernel_runs(Kernel::RmsNorm) {
                return tensor_ops::rms_norm_backward::<Self>(x, rstd, weight, grad, request, acc);
            }
            tensor_ops::rms_norm_backward_with_dx_kernel::<Self>(
                x,
                rstd,
                weight,
                grad,
                request,
                acc,
                cube::rms_norm_backward_x,
            )
        }

        fn rms_norm_weight_grad(
            x: CubeTensor<R>,
            rstd: CubeTensor<R>,
            grad: CubeTensor<R>,
        ) -> CubeTensor<R> {
            if !Self::rowwise_kernel_runs(Kernel::ColumnSums) {
                return tensor_ops::rms_norm_weight_grad::<Self>(x, rstd, grad);
            }
            let dtype = x.dtype;
            sum_parts::<Self>(cube::column_sums(grad, Some((x, rstd))), dtype)
        }

        fn sum_rows(x: CubeTensor<R>) -> CubeTensor<R> {
            if !Self::rowwise_kernel_runs(Kernel::ColumnSums) {
                return tensor_ops::sum_rows::<Self>(x);
            }
            let dtype = x.dtype;
            sum_parts::<Self>(cube::column_sums(x, None), dtype)
        }

        fn rotary_forward(
            x: CubeTensor<R>,
            cos: CubeTensor<R>,
            sin: CubeTensor<R>,
        ) -> CubeTensor<R> {
            if !Self::rowwise_kernel_runs(Kernel::Rotary) {
                return tensor_ops::rotary_forward::<Self>(x, cos, sin);
            }
            cube::rotary(x, cos, sin, false)
        }

        fn rotary_backward(
            grad: CubeTensor<R>,
            cos: CubeTensor<R>,
            sin: CubeTensor<R>,
        ) -> CubeTensor<R> {
            if !Self::rowwise_kernel_runs(Kernel::Rotary) {
                return tensor_ops::rotary_backward::<Self>(grad, cos, sin);
            }
            cube::rotary(grad, cos, sin, true)
        }

        fn swiglu_backward(
            gate: CubeTensor<R>,
            up: CubeTensor<R>,
            grad: CubeTensor<R>,
            request: [bool; 2],
        ) -> [Option<CubeTensor<R>>; 2] {
            if !Self::rowwise_kernel_runs(Kernel::SwiGlu) {
                return tensor_ops::swiglu_backward::<Self>(gate, up, grad, request);
            }
            let [dg, du] = cube::swiglu_backward(gate, up, grad);
            let [want_gate, want_up] = request;
            [want_gate.then_some(dg), want_up.then_some(du)]
        }

        fn token_embedding_backward(
            grad: CubeTensor<R>,
            ids: CubeTensor<R>,
            vocab: usize,
            dtype: DType,
            acc: Option<CubeTensor<R>>,
        ) -> CubeTensor<R> {
            if !Self::rowwise_kernel_runs(Kernel::Embedding) {
                return tensor_ops::embedding_backward::<Self>(grad, ids, vocab, dtype, acc);
            }
            let hidden = grad.meta.shape()[1];
            // The rows go straight into an accumulator that can take them; any other is added
            // after.
            let (start, rest) = match acc {
                Some(acc) if cube::embedding_adds_into(&acc, [vocab, hidden]) => (Some(acc), None),
                acc => (None, acc),
            };
            let mut out = cube::embedding_backward(grad, ids, vocab, start);
            if let Some(acc) = rest {
                out = Self::float_add(out, qwen_gemm::cast_to::<Self>(acc, DType::F32));
            }
            qwen_gemm::cast_to::<Self>(out, dtype)
        }

        fn has_rowwise_kernels() -> bool {
            crate::kernels::kernel_body().runs_kernels(qwen_gemm::is_cuda::<R>())
        }

        fn rowwise_kernel_runs(kernel: Kernel) -> bool {
            kernel_runs(kernel, qwen_gemm::is_cuda::<R>())
        }
    }
    /// The column sums' parts `[parts, n]` f32 added up (one part: already the sum), as `[n]`
    /// in `dtype`.
    fn sum_parts<B: Backend>(partial: FloatTensor<B>, dtype: DType) -> FloatTensor<B> {
        let partial = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(partial));
        let [parts, n] = partial.dims();
        let sum = if parts == 1 {
            partial
        } else {
            partial.sum_dim(0)
        };
        sum.reshape([n]).cast(dtype).into_primitive().tensor()
    }
}

/// Under fusion, RMSNorm, the rotary embedding, SwiGLU's backward and the embedding's gradient,
/// where the inner backend has kernels for them,
/// run as one custom operation each (fusion ends its pending fused kernels there, then calls the
/// inner backend's method); with tensor ops they stay ordinary fusion operations.
#[cfg(feature = "fusion")]
mod fusion {
    use std::marker::PhantomData;

    use burn::tensor::DType;
    use burn::tensor::ops::{FloatTensor, IntTensor};
    use burn_fusion::stream::{Operation, OperationStreams};
    use burn_fusion::{Fusion, FusionBackend, FusionRuntime};
    use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};

    use crate::kernels::Kernel;
    use crate::rowwise::{RowwiseBackend, tensor_ops};

    type Handles<B> =
        HandleContainer<<<B as FusionBackend>::FusionRuntime as FusionRuntime>::FusionHandle>;

    /// Which inner method a custom operation runs, and its inputs and outputs.
    #[derive(Clone, Copy, Debug)]
    enum Kind {
        /// `[x, weight] -> [y, rstd]`
        RmsNorm { eps: f64 },
        /// `[x, rstd, weight, grad] -> [dx]`, or `[x, rstd, weight, grad, acc] -> [acc + dx]`
        RmsNormBackwardX { accumulate: bool },
        /// `[x, cos, sin] -> [y]`
        Rotary { backward: bool },
        /// `[grad, ids (int)] -> [table gradient]`, or `[grad, ids, acc] -> [acc + table gradient]`
        EmbeddingBackward {
            vocab: usize,
            dtype: DType,
            accumulate: bool,
        },
        /// `[gate, up, grad] -> [d gate, d up]`
        SwigluBackward,
        /// `[x, rstd, grad] -> [weight gradient]`
        RmsNormWeightGrad,
        /// `[x] -> [sum over rows]`
        SumRows,
    }

    impl Kind {
        fn name(self) -> &'static str {
            match self {
                Self::RmsNorm { .. } => "qwen_model::rms_norm",
                Self::RmsNormBackwardX { accumulate: false } => "qwen_model::rms_norm_backward_x",
                Self::RmsNormBackwardX { accumulate: true } => {
                    "qwen_model::rms_norm_backward_x_add"
                }
                Self::Rotary { backward: false } => "qwen_model::rotary",
                Self::Rotary { backward: true } => "qwen_model::rotary_backward",
                Self::EmbeddingBackward {
                    accumulate: false, ..
                } => "qwen_model::embedding_backward",
                Self::EmbeddingBackward {
                    accumulate: true, ..
                } => "qwen_model::embedding_backward_add",
                Self::SwigluBackward => "qwen_model::swiglu_backward",
                Self::RmsNormWeightGrad => "qwen_model::rms_norm_weight_grad",
                Self::SumRows => "qwen_model::sum_rows",
            }
        }
    }

    #[derive(Clone, Debug)]
    struct RowOp<B> {
        desc: CustomOpIr,
        kind: Kind,
        _backend: PhantomData<B>,
    }

    impl<B: FusionBackend + RowwiseBackend> Operation<B::FusionRuntime> for RowOp<B> {
        fn execute(&self, handles: &mut Handles<B>) {
            if let Kind::EmbeddingBackward { vocab, dtype, .. } = self.kind {
                let (grad, ids, acc) = match &self.desc.inputs[..] {
                    [grad, ids] => (grad, ids, None),
                    [grad, ids, acc] => (grad, ids, Some(acc)),
                    _ => unreachable!("the embedding's gradient takes two or three inputs"),
                };
                let (grad, ids) = (
                    handles.get_float_tensor::<B>(grad),
                    handles.get_int_tensor::<B>(ids),
                );
                // The accumulator's last reader is this op: fusion hands its handle over, so
                // the inner backend can add into it in place.
                let acc = acc.map(|acc| handles.get_float_tensor::<B>(acc));
                let out = B::token_embedding_backward(grad, ids, vocab, dtype, acc);
                handles.register_float_tensor::<B>(&self.desc.outputs[0].id, out);
                return;
            }
            let mut inputs = self
                .desc
                .inputs
                .iter()
                .map(|ir| handles.get_float_tensor::<B>(ir));
            let mut next = || inputs.next().expect("the op's inputs");
            let outputs = match self.kind {
                Kind::RmsNorm { eps } => {
                    let (y, rstd) = B::rms_norm_forward(next(), next(), eps);
                    vec![y, rstd]
                }
                Kind::RmsNormBackwardX { accumulate } => {
                    let (x, rstd, weight, grad) = (next(), next(), next(), next());
                    let acc = accumulate.then(next);
                    let [dx, _] = B::rms_norm_backward(x, rstd, weight, grad, [true, false], acc);
                    vec![dx.expect("dx was asked for")]
                }
                Kind::EmbeddingBackward { .. } => unreachable!("handled above"),
                Kind::RmsNormWeightGrad => {
                    let (x, rstd, grad) = (next(), next(), next());
                    vec![B::rms_norm_weight_grad(x, rstd, grad)]
                }
                Kind::SumRows => vec![B::sum_rows(next())],
                Kind::SwigluBackward => {
                    let (gate, up, grad) = (next(), next(), next());
                    let [dg, du] = B::swiglu_backward(gate, up, grad, [true, true]);
                    vec![dg.expect("d gate"), du.expect("d up")]
                }
                Kind::Rotary { backward } => {
                    let (x, cos, sin) = (next(), next(), next());
                    vec![if backward {
                        B::rotary_backward(x, cos, sin)
                    } else {
                        B::rotary_forward(x, cos, sin)
                    }]
                }
            };
            for (ir, tensor) in self.desc.outputs.iter().zip(outputs) {
                handles.register_float_tensor::<B>(&ir.id, tensor);
            }
        }
    }

    /// One custom operation running `kind` on the inner backend; `outputs` are the shapes and
    /// dtypes of its results.
    fn register<B: FusionBackend + RowwiseBackend>(
        kind: Kind,
        inputs: Vec<FloatTensor<Fusion<B>>>,
        outputs: Vec<(Vec<usize>, DType)>,
    ) -> Vec<FloatTensor<Fusion<B>>> {
        let client = inputs[0].client.clone();
        let streams = OperationStreams::with_inputs(&inputs);
        let outputs: Vec<_> = outputs
            .into_iter()
            .map(|(shape, dtype)| {
                TensorIr::uninit(client.create_empty_handle(), shape.into(), dtype)
            })
            .collect();
        let inputs: Vec<_> = inputs.into_iter().map(|t| t.into_ir()).collect();
        let desc = CustomOpIr::new(kind.name(), &inputs, &outputs);
        let op = RowOp::<B> {
            desc: desc.clone(),
            kind,
            _backend: PhantomData,
        };
        client.register(streams, OperationIr::Custom(desc), op)
    }

    /// [`register`] for an operation with one result shaped and typed as its first input.
    fn register_like_first<B: FusionBackend + RowwiseBackend>(
        kind: Kind,
        inputs: Vec<FloatTensor<Fusion<B>>>,
    ) -> FloatTensor<Fusion<B>> {
        let output = (inputs[0].shape.as_slice().to_vec(), inputs[0].dtype);
        let mut out = register::<B>(kind, inputs, vec![output]);
        out.pop().expect("the op's result")
    }

    impl<B: FusionBackend + RowwiseBackend> RowwiseBackend for Fusion<B> {
        fn rms_norm_forward(
            x: FloatTensor<Self>,
            weight: FloatTensor<Self>,
            eps: f64,
        ) -> (FloatTensor<Self>, FloatTensor<Self>) {
            if !B::rowwise_kernel_runs(Kernel::RmsNorm) {
                return tensor_ops::rms_norm_forward::<Self>(x, weight, eps);
            }
            let shape = x.shape.as_slice().to_vec();
            let outputs = vec![(shape.clone(), x.dtype), (vec![shape[0], 1], DType::F32)];
            let mut out = register::<B>(Kind::RmsNorm { eps }, vec![x, weight], outputs);
            let rstd = out.pop().expect("rstd");
            (out.pop().expect("y"), rstd)
        }

        fn rms_norm_backward(
            x: FloatTensor<Self>,
            rstd: FloatTensor<Self>,
            weight: FloatTensor<Self>,
            grad: FloatTensor<Self>,
            request: [bool; 2],
            acc: Option<FloatTensor<Self>>,
        ) -> [Option<FloatTensor<Self>>; 2] {
            if !B::rowwise_kernel_runs(Kernel::RmsNorm) {
                return tensor_ops::rms_norm_backward::<Self>(x, rstd, weight, grad, request, acc);
            }
            tensor_ops::rms_norm_backward_with_dx_kernel::<Self>(
                x,
                rstd,
                weight,
                grad,
                request,
                acc,
                |x, rstd, weight, grad, acc| {
                    let kind = Kind::RmsNormBackwardX {
                        accumulate: acc.is_some(),
                    };
                    let mut inputs = vec![x, rstd, weight, grad];
                    inputs.extend(acc);
                    register_like_first::<B>(kind, inputs)
                },
            )
        }

        fn rms_norm_weight_grad(
            x: FloatTensor<Self>,
            rstd: FloatTensor<Self>,
            grad: FloatTensor<Self>,
        ) -> FloatTensor<Self> {
            if !B::rowwise_kernel_runs(Kernel::ColumnSums) {
                return tensor_ops::rms_norm_weight_grad::<Self>(x, rstd, grad);
            }
            let output = (vec![x.shape.as_slice()[1]], x.dtype);
            let kind = Kind::RmsNormWeightGrad;
            let mut out = register::<B>(kind, vec![x, rstd, grad], vec![output]);
            out.pop().expect("the weight's gradient")
        }

        fn sum_rows(x: FloatTensor<Self>) -> FloatTensor<Self> {
            if !B::rowwise_kernel_runs(Kernel::ColumnSums) {
                return tensor_ops::sum_rows::<Self>(x);
            }
            let output = (vec![x.shape.as_slice()[1]], x.dtype);
            let mut out = register::<B>(Kind::SumRows, vec![x], vec![output]);
            out.pop().expect("the sums")
        }

        fn rotary_forward(
            x: FloatTensor<Self>,
            cos: FloatTensor<Self>,
            sin: FloatTensor<Self>,
        ) -> FloatTensor<Self> {
            if !B::rowwise_kernel_runs(Kernel::Rotary) {
                return tensor_ops::rotary_forward::<Self>(x, cos, sin);
            }
            register_like_first::<B>(Kind::Rotary { backward: false }, vec![x, cos, sin])
        }

        fn rotary_backward(
            grad: FloatTensor<Self>,
            cos: FloatTensor<Self>,
            sin: FloatTensor<Self>,
        ) -> FloatTensor<Self> {
            if !B::rowwise_kernel_runs(Kernel::Rotary) {
                return tensor_ops::rotary_backward::<Self>(grad, cos, sin);
            }
            register_like_first::<B>(Kind::Rotary { backward: true }, vec![grad, cos, sin])
        }

        fn swiglu_backward(
            gate: FloatTensor<Self>,
            up: FloatTensor<Self>,
            grad: FloatTensor<Self>,
            request: [bool; 2],
        ) -> [Option<FloatTensor<Self>>; 2] {
            if !B::rowwise_kernel_runs(Kernel::SwiGlu) {
                return tensor_ops::swiglu_backward::<Self>(gate, up, grad, request);
            }
            let like_gate = (gate.shape.as_slice().to_vec(), gate.dtype);
            let outputs = vec![like_gate.clone(), like_gate];
            let mut out = register::<B>(Kind::SwigluBackward, vec![gate, up, grad], outputs);
            let du = out.pop().expect("d up");
            let dg = out.pop().expect("d gate");
            let [want_gate, want_up] = request;
            [want_gate.then_some(dg), want_up.then_some(du)]
        }

        fn token_embedding_backward(
            grad: FloatTensor<Self>,
            ids: IntTensor<Self>,
            vocab: usize,
            dtype: DType,
            acc: Option<FloatTensor<Self>>,
        ) -> FloatTensor<Self> {
            if !B::rowwise_kernel_runs(Kernel::Embedding) {
                return tensor_ops::embedding_backward::<Self>(grad, ids, vocab, dtype, acc);
            }
            let hidden = grad.shape.as_slice()[1];
            let kind = Kind::EmbeddingBackward {
                vocab,
                dtype,
                accumulate: acc.is_some(),
            };
            let mut inputs = vec![grad, ids];
            inputs.extend(acc);
            let mut out = register::<B>(kind, inputs, vec![(vec![vocab, hidden], dtype)]);
            out.pop().expect("the table's gradient")
        }

        fn has_rowwise_kernels() -> bool {
            B::has_rowwise_kernels()
        }

        fn rowwise_kernel_runs(kernel: Kernel) -> bool {
            B::rowwise_kernel_runs(kernel)
        }
    }
}
