//! `AttentionBackend` for the plain backends, each with the default (tensor-op) kernels, except
//! for the block softmax on CubeCL backends (`attention::cube`).
//!
//! A blanket `impl<B: Backend>` would overlap the one for `Autodiff<B, C>`, so each backend
//! family gets its own impl behind a feature of this crate.

#[cfg(feature = "flex")]
impl super::AttentionBackend for burn::backend::Flex {}

#[cfg(feature = "ndarray")]
impl super::AttentionBackend for burn::backend::NdArray {}

#[cfg(feature = "cubecl")]
mod cube {
    use burn::tensor::backend::Backend;
    use burn_cubecl::tensor::CubeTensor;
    use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};

    use crate::attention::softmax::{self, CallSegments, ScoreBlock};
    use crate::attention::{AttentionBackend, SoftmaxBackward, SoftmaxForward, cube};

    impl<R, F, I, BT> AttentionBackend for CubeBackend<R, F, I, BT>
    where
        R: CubeRuntime,
        F: FloatElement,
        I: IntElement,
        BT: BoolElement,
        Self: Backend<FloatTensorPrimitive = CubeTensor<R>, IntTensorPrimitive = CubeTensor<R>>,
    {
        fn attention_softmax(
            scores: CubeTensor<R>,
            segments: &CallSegments<Self>,
            block: &ScoreBlock,
        ) -> SoftmaxForward<Self> {
            if !Self::has_softmax_kernel() {
                return softmax::forward_reference::<Self>(scores, segments, block);
            }
            let (probs, lse) = cube::softmax_forward(
                scores,
                segments.query_segments.clone(),
                segments.key_segments.clone(),
                block,
            );
            SoftmaxForward { probs, lse }
        }

        fn attention_softmax_backward(
            scores: CubeTensor<R>,
            lse: CubeTensor<R>,
            grad: Option<(CubeTensor<R>, CubeTensor<R>)>,
            segments: &CallSegments<Self>,
            block: &ScoreBlock,
        ) -> SoftmaxBackward<Self> {
            if !Self::has_softmax_kernel() {
                return softmax::backward_reference::<Self>(scores, lse, grad, segments, block);
            }
            let (probs, grad_scores) = cube::softmax_backward(
                scores,
                lse,
                grad,
                segments.query_segments.clone(),
                segments.key_segments.clone(),
                block,
            );
            SoftmaxBackward { probs, grad_scores }
        }

        fn has_softmax_kernel() -> bool {
            crate::kernels::kernel_runs(crate::kernels::Kernel::Softmax, qwen_gemm::is_cuda::<R>())
        }
    }
}

/// Under fusion, a block softmax whose inner backend has a kernel runs as one custom operation
/// (fusion ends its pending fused kernels there, then calls the inner backend's method); with
/// tensor ops it stays ordinary fusion operations.
#[cfg(feature = "fusion")]
mod fusion {
    use std::marker::PhantomData;

    use burn::tensor::DType;
    use burn::tensor::ops::FloatTensor;
    use burn_fusion::stream::{Operation, OperationStreams};
    use burn_fusion::{Fusion, FusionBackend, FusionRuntime};
    use burn_ir::{CustomOpIr, HandleContainer, OperationIr, OperationOutput, TensorIr};

    use crate::attention::softmax::{self, CallSegments, ScoreBlock};
    use crate::attention::{AttentionBackend, SoftmaxBackward, SoftmaxForward};

    type Handles<B> =
        HandleContainer<<<B as FusionBackend>::FusionRuntime as FusionRuntime>::FusionHandle>;

    /// The call's segments on the inner backend, from the last three inputs of a custom op.
    fn inner_segments<B: FusionBackend>(
        handles: &mut Handles<B>,
        irs: &[TensorIr],
    ) -> CallSegments<B> {
        let [query, key, positions] = irs else {
            unreachable!("a block softmax op ends with its three segment inputs")
        };
        CallSegments {
            query_segments: handles.get_int_tensor::<B>(query),
            key_segments: handles.get_int_tensor::<B>(key),
            positions: handles.get_int_tensor::<B>(positions),
        }
    }

    fn segment_irs<B: FusionBackend>(segments: &CallSegments<Fusion<B>>) -> [TensorIr; 3] {
        [
            segments.query_segments.clone().into_ir(),
            segments.key_segments.clone().into_ir(),
            segments.positions.clone().into_ir(),
        ]
    }

    #[derive(Clone, Debug)]
    struct Forward<B> {
        desc: CustomOpIr,
        block: ScoreBlock,
        _backend: PhantomData<B>,
    }

    impl<B: FusionBackend + AttentionBackend> Operation<B::FusionRuntime> for Forward<B> {
        fn execute(&self, handles: &mut Handles<B>) {
            let ([scores, segments @ ..], [probs, lse]) = self.desc.as_fixed::<4, 2>();
            let segments = inner_segments::<B>(handles, segments);
            let scores = handles.get_float_tensor::<B>(scores);
            let out = B::attention_softmax(scores, &segments, &self.block);
            handles.register_float_tensor::<B>(&probs.id, out.probs);
            handles.register_float_tensor::<B>(&lse.id, out.lse);
        }
    }

    #[derive(Clone, Debug)]
    struct Backward<B> {
        desc: CustomOpIr,
        block: ScoreBlock,
        _backend: PhantomData<B>,
    }

    impl<B: FusionBackend + AttentionBackend> Operation<B::FusionRuntime> for Backward<B> {
        fn execute(&self, handles: &mut Handles<B>) {
            // Inputs: scores, lse, [dP, D,] three segment tensors; outputs: probs[, dS].
            let inputs = &self.desc.inputs;
            let (tensors, segments) = inputs.split_at(inputs.len() - 3);
            let segments = inner_segments::<B>(handles, segments);
            let scores = handles.get_float_tensor::<B>(&tensors[0]);
            let lse = handles.get_float_tensor::<B>(&tensors[1]);
            let grad = match &tensors[2..] {
                [grad_probs, delta] => Some((
                    handles.get_float_tensor::<B>(grad_probs),
                    handles.get_float_tensor::<B>(delta),
                )),
                [] => None,
                _ => unreachable!("a block softmax backward has dP and D or neither"),
            };
            let out = B::attention_softmax_backward(scores, lse, grad, &segments, &self.block);
            let outputs = &self.desc.outputs;
            handles.register_float_tensor::<B>(&outputs[0].id, out.probs);
            if let (Some(grad_scores), Some(ir)) = (out.grad_scores, outputs.get(1)) {
                handles.register_float_tensor::<B>(&ir.id, grad_scores);
            }
        }
    }

    impl<B: FusionBackend + AttentionBackend> AttentionBackend for Fusion<B> {
        fn attention_softmax(
            scores: FloatTensor<Self>,
            segments: &CallSegments<Self>,
            block: &ScoreBlock,
        ) -> SoftmaxForward<Self> {
            if !B::has_softmax_kernel() {
                return softmax::forward_reference::<Self>(scores, segments, block);
            }
            let (client, dtype) = (scores.client.clone(), scores.dtype);
            let streams = OperationStreams::with_inputs([
                &scores,
                &segments.query_segments,
                &segments.key_segments,
                &segments.positions,
            ]);
            let heads = block.kv_heads * block.n_rep;
            let probs = TensorIr::uninit(client.create_empty_handle(), scores.shape.clone(), dtype);
            let lse = TensorIr::uninit(
                client.create_empty_handle(),
                [block.batch, heads, block.rows].into(),
                DType::F32,
            );
            let [q, k, positions] = segment_irs(segments);
            let desc = CustomOpIr::new(
                "qwen_model::attention_softmax",
                &[scores.into_ir(), q, k, positions],
                &[probs, lse],
            );
            let op = Forward::<B> {
                desc: desc.clone(),
                block: *block,
                _backend: PhantomData,
            };
            let [probs, lse] = client
                .register(streams, OperationIr::Custom(desc), op)
                .outputs();
            SoftmaxForward { probs, lse }
        }

        fn attention_softmax_backward(
            scores: FloatTensor<Self>,
            lse: FloatTensor<Self>,
            grad: Option<(FloatTensor<Self>, FloatTensor<Self>)>,
            segments: &CallSegments<Self>,
            block: &ScoreBlock,
        ) -> SoftmaxBackward<Self> {
            if !B::has_softmax_kernel() {
                return softmax::backward_reference::<Self>(scores, lse, grad, segments, block);
            }
            let (client, dtype) = (scores.client.clone(), scores.dtype);
            let mut streams = vec![&scores, &lse];
            if let Some((grad_probs, delta)) = &grad {
                streams.extend([grad_probs, delta]);
            }
            streams.extend([
                &segments.query_segments,
                &segments.key_segments,
                &segments.positions,
            ]);
            let streams = OperationStreams::with_inputs(streams);
            let shape = scores.shape.clone();
            let with_grad = grad.is_some();
            let mut inputs = vec![scores.into_ir(), lse.into_ir()];
            if let Some((grad_probs, delta)) = grad {
                inputs.extend([grad_probs.into_ir(), delta.into_ir()]);
            }
            inputs.extend(segment_irs(segments));
            let mut outputs = vec![TensorIr::uninit(
                client.create_empty_handle(),
                shape.clone(),
                dtype,
            )];
            if with_grad {
                outputs.push(TensorIr::uninit(client.create_empty_handle(), shape, dtype));
            }
            let desc = CustomOpIr::new("qwen_model::attention_softmax_backward", &inputs, &outputs);
            let op = Backward::<B> {
                desc: desc.clone(),
                block: *block,
                _backend: PhantomData,
            };
            let mut outputs = client
                .register(streams, OperationIr::Custom(desc), op)
                .into_iter();
            let probs = outputs.next().expect("the probabilities");
            SoftmaxBackward {
                probs,
                grad_scores: outputs.next(),
            }
        }

        fn has_softmax_kernel() -> bool {
            B::has_softmax_kernel()
        }
    }
}
