//! `AttentionBackend` for the plain backends, each with the default (tensor-op) kernels, except
//! for the block softmax on CubeCL backends (`attention::cube`) and the fused attention on
//! CUDA (`attention::flash`).
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
    use burn::tensor::ops::FloatTensor;
    use burn::tensor::{DType, Shape};
    use burn_cubecl::tensor::CubeTensor;
    use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};

    use crate::attention::softmax::{self, CallSegments, ScoreBlock};
    use crate::attention::{
        AttentionBackend, AttentionForward, AttentionGradRequest, AttentionGrads, AttentionInputs,
        AttentionParams, SoftmaxBackward, SoftmaxForward, cube, kernel,
    };

    /// The call's five inputs (q, k, v, query and key segments), where the fused attention
    /// takes the call on `B` (`has_fused_attention`).
    #[cfg(feature = "flash")]
    fn fused_inputs<'a, R: CubeRuntime, B>(
        inputs: &'a AttentionInputs<B>,
        params: &AttentionParams,
    ) -> Option<[&'a CubeTensor<R>; 5]>
    where
        B: AttentionBackend<
                FloatTensorPrimitive = CubeTensor<R>,
                IntTensorPrimitive = CubeTensor<R>,
            >,
    {
        let q = &inputs.q;
        B::has_fused_attention(q.meta.shape(), inputs.k.meta.shape(), q.dtype, params).then_some([
            q,
            &inputs.k,
            &inputs.v,
            &inputs.query_segments,
            &inputs.key_segments,
        ])
    }

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

        #[cfg_attr(not(feature = "flash"), allow(unused_variables))]
        fn has_fused_attention(
            q: &Shape,
            k: &Shape,
            dtype: DType,
            params: &AttentionParams,
        ) -> bool {
            #[cfg(feature = "flash")]
            {
                let cuda = qwen_gemm::is_cuda::<R>();
                cuda && crate::kernels::kernel_runs(crate::kernels::Kernel::Flash, cuda)
                    && crate::attention::flash_plan::takes(q, k, dtype, params)
            }
            #[cfg(not(feature = "flash"))]
            false
        }

        fn causal_attention_forward(
            inputs: AttentionInputs<Self>,
            params: &AttentionParams,
        ) -> AttentionForward<Self> {
            #[cfg(feature = "flash")]
            if let Some(fused) = fused_inputs::<R, Self>(&inputs, params)
                && let Some((output, lse)) = crate::attention::flash::forward::<R>(fused, params)
            {
                crate::attention::count_fused_pass();
                return AttentionForward { output, lse };
            }
            kernel::forward::<Self>(inputs, params)
        }

        fn causal_attention_backward(
            inputs: AttentionInputs<Self>,
            forward: AttentionForward<Self>,
            grad_output: FloatTensor<Self>,
            params: &AttentionParams,
            request: AttentionGradRequest,
        ) -> AttentionGrads<Self> {
            #[cfg(feature = "flash")]
            if let Some(fused) = fused_inputs::<R, Self>(&inputs, params)
                && let Some([grad_q, grad_k, grad_v]) = crate::attention::flash::backward::<R>(
                    fused,
                    &forward.output,
                    &forward.lse,
                    &grad_output,
                    params,
                )
            {
                use burn::tensor::ops::FloatTensorOps;
                crate::attention::count_fused_pass();
                // The kernels accumulate in f32; the gradients come back in the inputs' dtype.
                let dtype = burn::tensor::FloatDType::from(inputs.q.dtype);
                let cast = |grad, wanted: bool| wanted.then(|| Self::float_cast(grad, dtype));
                return AttentionGrads {
                    q: cast(grad_q, request.q),
                    k: cast(grad_k, request.k),
                    v: cast(grad_v, request.v),
                };
            }
            kernel::backward::<Self>(inputs, forward, grad_output, params, request)
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
    use crate::attention::{
        AttentionBackend, AttentionForward, AttentionGradRequest, AttentionGrads, AttentionInputs,
        AttentionParams, SoftmaxBackward, SoftmaxForward, kernel,
    };

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

    /// The inner backend's attention inputs, from the first five inputs of a custom op.
    fn inner_inputs<B: FusionBackend>(
        handles: &mut Handles<B>,
        irs: &[TensorIr],
    ) -> AttentionInputs<B> {
        let [q, k, v, query_segments, key_segments, ..] = irs else {
            unreachable!("an attention op starts with q, k, v and the two segment tensors")
        };
        AttentionInputs {
            q: handles.get_float_tensor::<B>(q),
            k: handles.get_float_tensor::<B>(k),
            v: handles.get_float_tensor::<B>(v),
            query_segments: handles.get_int_tensor::<B>(query_segments),
            key_segments: handles.get_int_tensor::<B>(key_segments),
        }
    }

    fn input_irs<B: FusionBackend>(inputs: AttentionInputs<Fusion<B>>) -> [TensorIr; 5] {
        [
            inputs.q.into_ir(),
            inputs.k.into_ir(),
            inputs.v.into_ir(),
            inputs.query_segments.into_ir(),
            inputs.key_segments.into_ir(),
        ]
    }

    /// One fused attention pass as a custom operation: the inner backend's
    /// `causal_attention_forward` (`forward`) or `causal_attention_backward`.
    #[derive(Clone, Debug)]
    struct FusedAttention<B> {
        desc: CustomOpIr,
        params: AttentionParams,
        forward: bool,
        _backend: PhantomData<B>,
    }

    impl<B: FusionBackend + AttentionBackend> Operation<B::FusionRuntime> for FusedAttention<B> {
        fn execute(&self, handles: &mut Handles<B>) {
            let (inputs, outputs) = (&self.desc.inputs, &self.desc.outputs);
            let call = inner_inputs::<B>(handles, inputs);
            if self.forward {
                let out = B::causal_attention_forward(call, &self.params);
                handles.register_float_tensor::<B>(&outputs[0].id, out.output);
                handles.register_float_tensor::<B>(&outputs[1].id, out.lse);
                return;
            }
            // Inputs 5..8: the forward's output and lse, then the output's gradient.
            let forward = AttentionForward {
                output: handles.get_float_tensor::<B>(&inputs[5]),
                lse: handles.get_float_tensor::<B>(&inputs[6]),
            };
            let grad_output = handles.get_float_tensor::<B>(&inputs[7]);
            let grads = B::causal_attention_backward(
                call,
                forward,
                grad_output,
                &self.params,
                AttentionGradRequest::ALL,
            );
            for (ir, grad) in outputs.iter().zip([grads.q, grads.k, grads.v]) {
                let grad = grad.expect("every gradient is requested");
                handles.register_float_tensor::<B>(&ir.id, grad);
            }
        }
    }

    impl<B: FusionBackend + AttentionBackend> AttentionBackend for Fusion<B> {
        fn has_fused_attention(
            q: &burn::tensor::Shape,
            k: &burn::tensor::Shape,
            dtype: DType,
            params: &AttentionParams,
        ) -> bool {
            B::has_fused_attention(q, k, dtype, params)
        }

        fn causal_attention_forward(
            inputs: AttentionInputs<Self>,
            params: &AttentionParams,
        ) -> AttentionForward<Self> {
            let (q, k) = (&inputs.q, &inputs.k);
            if !B::has_fused_attention(&q.shape, &k.shape, q.dtype, params) {
                return kernel::forward::<Self>(inputs, params);
            }
            let (client, dtype, shape) = (q.client.clone(), q.dtype, q.shape.clone());
            let streams = OperationStreams::with_inputs([
                &inputs.q,
                &inputs.k,
                &inputs.v,
                &inputs.query_segments,
                &inputs.key_segments,
            ]);
            let lse_shape = [shape[0], shape[1], shape[2]].into();
            let outputs = [
                TensorIr::uninit(client.create_empty_handle(), shape, dtype),
                TensorIr::uninit(client.create_empty_handle(), lse_shape, DType::F32),
            ];
            let desc = CustomOpIr::new("qwen_model::fused_attention", &input_irs(inputs), &outputs);
            let op = FusedAttention::<B> {
                desc: desc.clone(),
                params: *params,
                forward: true,
                _backend: PhantomData,
            };
            let [output, lse] = client
                .register(streams, OperationIr::Custom(desc), op)
                .outputs();
            AttentionForward { output, lse }
        }

        fn causal_attention_backward(
            inputs: AttentionInputs<Self>,
            forward: AttentionForward<Self>,
            grad_output: FloatTensor<Self>,
            params: &AttentionParams,
            request: AttentionGradRequest,
        ) -> AttentionGrads<Self> {
            let (q, k) = (&inputs.q, &inputs.k);
            if !B::has_fused_attention(&q.shape, &k.shape, q.dtype, params) {
                return kernel::backward::<Self>(inputs, forward, grad_output, params, request);
            }
            let client = q.client.clone();
            let outputs = [&inputs.q, &inputs.k, &inputs.v]
                .map(|t| TensorIr::uninit(client.create_empty_handle(), t.shape.clone(), t.dtype));
            let streams = OperationStreams::with_inputs([
                &inputs.q,
                &inputs.k,
                &inputs.v,
                &inputs.query_segments,
                &inputs.key_segments,
                &forward.output,
                &forward.lse,
                &grad_output,
            ]);
            let mut irs = input_irs(inputs).to_vec();
            irs.extend([
                forward.output.into_ir(),
                forward.lse.into_ir(),
                grad_output.into_ir(),
            ]);
            let desc = CustomOpIr::new("qwen_model::fused_attention_backward", &irs, &outputs);
            let op = FusedAttention::<B> {
                desc: desc.clone(),
                params: *params,
                forward: false,
                _backend: PhantomData,
            };
            let [q, k, v] = client
                .register(streams, OperationIr::Custom(desc), op)
                .outputs();
            AttentionGrads {
                q: request.q.then_some(q),
                k: request.k.then_some(k),
                v: request.v.then_some(v),
            }
        }

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
