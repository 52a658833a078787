//! `OptimizerBackend` for CubeCL backends (the kernels on CUDA, tensor ops elsewhere) and for
//! burn's fusion over them (one custom operation per call, which runs the inner backend's).

#[cfg(feature = "cubecl")]
mod cube {
    use burn::tensor::backend::Backend;
    use burn::tensor::ops::FloatTensor;
    use burn_cubecl::tensor::CubeTensor;
    use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
    use qwen_model::{Kernel, kernels::kernel_runs};

    use crate::fused_adamw::{AdamwGroup, AdamwGroupOut, AdamwStep, OptimizerBackend, tensor_ops};

    impl<R, F, I, BT> OptimizerBackend for CubeBackend<R, F, I, BT>
    where
        R: CubeRuntime,
        F: FloatElement,
        I: IntElement,
        BT: BoolElement,
        Self: Backend<FloatTensorPrimitive = CubeTensor<R>>,
    {
        fn has_adamw_kernels() -> bool {
            // CUDA C: on CUDA only, whatever the kernel body (`kernel` runs the CubeCL
            // kernels on wgpu too, not these).
            let on_cuda = cfg!(feature = "cuda-unfused") && qwen_gemm::is_cuda::<R>();
            on_cuda && kernel_runs(Kernel::Adamw, true)
        }

        fn grad_norm(grads: Vec<FloatTensor<Self>>) -> FloatTensor<Self> {
            #[cfg(feature = "cuda-unfused")]
            if Self::has_adamw_kernels()
                && let Some(norm) = crate::fused_adamw::cuda::grad_norm(&grads)
            {
                return norm;
            }
            tensor_ops::grad_norm::<Self>(grads)
        }

        fn adamw_group(
            group: AdamwGroup<Self>,
            norm: FloatTensor<Self>,
            step: AdamwStep,
        ) -> AdamwGroupOut<Self> {
            #[cfg(feature = "cuda-unfused")]
            if Self::has_adamw_kernels()
                && let Some((values, [first, second], copies)) =
                    crate::fused_adamw::cuda::adamw_group(
                        &group.values,
                        &group.grads,
                        &group.decays,
                        [&group.first, &group.second],
                        &norm,
                        AdamwStep {
                            bf16_copies: step.bf16_copies && kernel_runs(Kernel::Bf16Copies, true),
                            ..step
                        },
                    )
            {
                // The old values' copies go, the new ones' are kept for the model's casts.
                for old in &group.values {
                    qwen_gemm::copies::forget(old);
                }
                for (value, copy) in values.iter().zip(copies) {
                    qwen_gemm::copies::remember(value, copy);
                }
                return AdamwGroupOut {
                    values,
                    first,
                    second,
                };
            }
            tensor_ops::adamw_group::<Self>(group, norm, step)
        }
    }
}

/// Under fusion, each call is one custom operation (fusion ends its pending fused kernels
/// there, then calls the inner backend's method) where the inner backend has the kernels; with
/// tensor ops the calls stay ordinary fusion operations.
#[cfg(feature = "fusion")]
mod fusion {
    use std::marker::PhantomData;

    use burn::tensor::DType;
    use burn::tensor::ops::FloatTensor;
    use burn_fusion::stream::{Operation, OperationStreams};
    use burn_fusion::{Fusion, FusionBackend, FusionRuntime};
    use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};

    use crate::fused_adamw::{AdamwGroup, AdamwGroupOut, AdamwStep, OptimizerBackend, tensor_ops};

    type Handles<B> =
        HandleContainer<<<B as FusionBackend>::FusionRuntime as FusionRuntime>::FusionHandle>;

    #[derive(Clone, Debug)]
    enum Kind {
        /// `[grads..] -> [norm]`
        GradNorm,
        /// `[values.., grads.., first, second, norm] -> [values.., first, second]`
        Group { decays: Vec<bool>, step: AdamwStep },
    }

    #[derive(Clone, Debug)]
    struct AdamwOp<B> {
        desc: CustomOpIr,
        kind: Kind,
        _backend: PhantomData<B>,
    }

    impl<B: FusionBackend + OptimizerBackend> Operation<B::FusionRuntime> for AdamwOp<B> {
        fn execute(&self, handles: &mut Handles<B>) {
            let mut inputs: Vec<_> = self
                .desc
                .inputs
                .iter()
                .map(|ir| handles.get_float_tensor::<B>(ir))
                .collect();
            let outputs = match &self.kind {
                Kind::GradNorm => vec![B::grad_norm(inputs)],
                Kind::Group { decays, step } => {
                    let n = decays.len();
                    let norm = inputs.pop().expect("the norm");
                    let second = inputs.pop().expect("the second moments");
                    let first = inputs.pop().expect("the first moments");
                    let grads = inputs.split_off(n);
                    let group = AdamwGroup {
                        values: inputs,
                        grads,
                        decays: decays.clone(),
                        first,
                        second,
                    };
                    let out = B::adamw_group(group, norm, *step);
                    let mut outputs = out.values;
                    outputs.extend([out.first, out.second]);
                    outputs
                }
            };
            for (ir, tensor) in self.desc.outputs.iter().zip(outputs) {
                handles.register_float_tensor::<B>(&ir.id, tensor);
            }
        }
    }

    /// One custom operation running `kind` on the inner backend, with f32 results of `sizes`
    /// values each.
    fn register<B: FusionBackend + OptimizerBackend>(
        kind: Kind,
        name: &'static str,
        inputs: Vec<FloatTensor<Fusion<B>>>,
        sizes: Vec<usize>,
    ) -> Vec<FloatTensor<Fusion<B>>> {
        let client = inputs[0].client.clone();
        let streams = OperationStreams::with_inputs(&inputs);
        let outputs: Vec<_> = sizes
            .into_iter()
            .map(|len| TensorIr::uninit(client.create_empty_handle(), vec![len].into(), DType::F32))
            .collect();
        let inputs: Vec<_> = inputs.into_iter().map(|t| t.into_ir()).collect();
        let desc = CustomOpIr::new(name, &inputs, &outputs);
        let op = AdamwOp::<B> {
            desc: desc.clone(),
            kind,
            _backend: PhantomData,
        };
        client.register(streams, OperationIr::Custom(desc), op)
    }

    fn len<B: FusionBackend>(t: &FloatTensor<Fusion<B>>) -> usize {
        t.shape.as_slice().iter().product()
    }

    impl<B: FusionBackend + OptimizerBackend> OptimizerBackend for Fusion<B> {
        fn has_adamw_kernels() -> bool {
            B::has_adamw_kernels()
        }

        fn grad_norm(grads: Vec<FloatTensor<Self>>) -> FloatTensor<Self> {
            if !B::has_adamw_kernels() {
                return tensor_ops::grad_norm::<Self>(grads);
            }
            let name = "qwen_sft::grad_norm";
            register::<B>(Kind::GradNorm, name, grads, vec![1])
                .pop()
                .expect("the norm")
        }

        fn adamw_group(
            group: AdamwGroup<Self>,
            norm: FloatTensor<Self>,
            step: AdamwStep,
        ) -> AdamwGroupOut<Self> {
            if !B::has_adamw_kernels() {
                return tensor_ops::adamw_group::<Self>(group, norm, step);
            }
            let AdamwGroup {
                values,
                grads,
                decays,
                first,
                second,
            } = group;
            let mut sizes: Vec<usize> = values.iter().map(len::<B>).collect();
            let total: usize = sizes.iter().sum();
            sizes.extend([total, total]);
            let mut inputs = values;
            inputs.extend(grads);
            inputs.extend([first, second, norm]);
            let kind = Kind::Group { decays, step };
            let mut outputs = register::<B>(kind, "qwen_sft::adamw_group", inputs, sizes);
            let second = outputs.pop().expect("the second moments");
            let first = outputs.pop().expect("the first moments");
            AdamwGroupOut {
                values: outputs,
                first,
                second,
            }
        }
    }
}
