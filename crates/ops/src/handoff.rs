//! An output computed without a graph, handed to the graph as the result of an op with a
//! backward of our own: how every portable op (and gradient checkpointing) gets its gradients
//! on every device.
//!
//! candle's custom ops compute their forward from raw storages, one implementation per device.
//! Ours compute it from candle tensor ops instead (which run everywhere), on inputs cut from the
//! graph (`detach`), so nothing they make along the way is kept. [`attach`] then puts the result
//! into the graph as the output of a custom op over the original inputs: that op's forward, on
//! every device, only hands the result over (the CPU and CUDA copy its storage once, Metal
//! shares the buffer), and its backward is the op's own [`Backward`], which again uses only
//! candle tensor ops. The graph keeps the inputs and whatever the [`Backward`] holds (attention's
//! log-sum-exp, a checkpointed block's closure); the handed-over result itself is released as
//! soon as the graph owns its copy.
//!
//! With no input tracked, [`attach`] returns the result as it is: inference pays nothing.

use std::sync::Mutex;

use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, Layout, MetalStorage, Shape, Storage,
    Tensor,
};

use crate::Result;

/// The gradient rule of an op whose forward was computed elsewhere.
pub trait Backward: Send + Sync {
    /// The op's name, for candle's graph and for errors.
    fn name(&self) -> &'static str;

    /// The gradients of `inputs` (in their order; `None` for an input that needs none, such as
    /// one that is not tracked), given the op's output `y` and the gradient `dy` of the loss
    /// with respect to it. The inputs are those of the graph: detach them before computing, so
    /// that the backward builds no graph of its own.
    fn backward(&self, inputs: &[&Tensor], y: &Tensor, dy: &Tensor) -> Result<Vec<Option<Tensor>>>;
}

/// `y` (computed from `inputs` without a graph) as the output of an op over `inputs` (one to
/// three tensors) whose backward is `backward`. Returns `y` itself when no input is tracked.
pub fn attach<B: Backward + 'static>(y: Tensor, inputs: &[&Tensor], backward: B) -> Result<Tensor> {
    if !inputs.iter().any(|t| t.track_op()) {
        return Ok(y);
    }
    // The storage handed over must be exactly the output: contiguous, from its first element.
    let y = if y.is_contiguous() && y.layout().start_offset() == 0 {
        y.detach()
    } else {
        y.force_contiguous()?.detach()
    };
    let op = Handoff {
        y: Mutex::new(Some(y)),
        backward,
    };
    match *inputs {
        [a] => a.apply_op1(op),
        [a, b] => a.apply_op2(b, op),
        [a, b, c] => a.apply_op3(b, c, op),
        _ => candle_core::bail!(
            "{}: an op takes one to three inputs, not {}",
            op.backward.name(),
            inputs.len()
        ),
    }
}

/// The op [`attach`] puts into the graph.
struct Handoff<B> {
    /// The output, until the forward hands it over.
    y: Mutex<Option<Tensor>>,
    backward: B,
}

impl<B: Backward> Handoff<B> {
    /// The output's storage (a copy on the CPU and CUDA) and shape; once only.
    fn hand_over(&self) -> Result<(Storage, Shape)> {
        let y = self
            .y
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| {
                candle_core::Error::Msg(format!("{}: the forward ran twice", self.backward.name()))
            })?;
        let (storage, layout) = y.storage_and_layout();
        Ok((storage.try_clone(layout)?, layout.shape().clone()))
    }

    fn wrong_device<T>(&self, storage: &Storage) -> Result<T> {
        candle_core::bail!(
            "{}: the output was computed on {:?}, not on the inputs' device",
            self.backward.name(),
            storage.device().location()
        )
    }

    fn cpu(&self) -> Result<(CpuStorage, Shape)> {
        match self.hand_over()? {
            (Storage::Cpu(s), shape) => Ok((s, shape)),
            (other, _) => self.wrong_device(&other),
        }
    }

    fn cuda(&self) -> Result<(CudaStorage, Shape)> {
        match self.hand_over()? {
            (Storage::Cuda(s), shape) => Ok((s, shape)),
            (other, _) => self.wrong_device(&other),
        }
    }

    fn metal(&self) -> Result<(MetalStorage, Shape)> {
        match self.hand_over()? {
            (Storage::Metal(s), shape) => Ok((s, shape)),
            (other, _) => self.wrong_device(&other),
        }
    }

    /// The backward's gradients for `n` inputs, checked for count.
    fn grads(&self, inputs: &[&Tensor], y: &Tensor, dy: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let g = self.backward.backward(inputs, y, dy)?;
        if g.len() != inputs.len() {
            candle_core::bail!(
                "{}: {} gradients for {} inputs",
                self.backward.name(),
                g.len(),
                inputs.len()
            );
        }
        Ok(g)
    }
}

impl<B: Backward> CustomOp1 for Handoff<B> {
    fn name(&self) -> &'static str {
        self.backward.name()
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu()
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        self.cuda()
    }

    fn metal_fwd(&self, _: &MetalStorage, _: &Layout) -> Result<(MetalStorage, Shape)> {
        self.metal()
    }

    fn bwd(&self, a: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(self.grads(&[a], y, dy)?.pop().flatten())
    }
}

impl<B: Backward> CustomOp2 for Handoff<B> {
    fn name(&self) -> &'static str {
        self.backward.name()
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu()
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.cuda()
    }

    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        self.metal()
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let mut g = self.grads(&[a, b], y, dy)?.into_iter();
        Ok((g.next().flatten(), g.next().flatten()))
    }
}

impl<B: Backward> CustomOp3 for Handoff<B> {
    fn name(&self) -> &'static str {
        self.backward.name()
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu()
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.cuda()
    }

    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        self.metal()
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let mut g = self.grads(&[a, b, c], y, dy)?.into_iter();
        Ok((g.next().flatten(), g.next().flatten(), g.next().flatten()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// `y = a * b` with the textbook backward, computed outside the graph.
    struct Product;

    impl Backward for Product {
        fn name(&self) -> &'static str {
            "test-product"
        }

        fn backward(
            &self,
            inputs: &[&Tensor],
            _y: &Tensor,
            dy: &Tensor,
        ) -> Result<Vec<Option<Tensor>>> {
            let (a, b) = (inputs[0].detach(), inputs[1].detach());
            Ok(vec![
                inputs[0].track_op().then(|| dy * &b).transpose()?,
                inputs[1].track_op().then(|| dy * &a).transpose()?,
            ])
        }
    }

    fn product(a: &Tensor, b: &Tensor) -> Tensor {
        let y = (a.detach() * b.detach()).unwrap();
        attach(y, &[a, b], Product).unwrap()
    }

    #[test]
    fn the_handed_over_output_carries_the_given_backward() {
        let dev = Device::Cpu;
        let a = Var::from_tensor(&Tensor::new(&[1f32, 2., 3.], &dev).unwrap()).unwrap();
        let b = Tensor::new(&[4f32, 5., 6.], &dev).unwrap();
        // something before the op, so that its input is an inner node of the graph
        let a2 = (a.as_tensor() * 2.0).unwrap();
        let y = product(&a2, &b);
        assert_eq!(y.to_vec1::<f32>().unwrap(), [8., 20., 36.]);
        let g = y.sum_all().unwrap().backward().unwrap();
        assert_eq!(g.get(&a).unwrap().to_vec1::<f32>().unwrap(), [8., 10., 12.]);
        assert!(g.get(&b).is_none());
    }

    #[test]
    fn without_a_tracked_input_the_output_is_returned_as_it_is() {
        let a = Tensor::ones(3, DType::F32, &Device::Cpu).unwrap();
        let y = product(&a, &a);
        assert!(!y.track_op());
    }

    #[test]
    fn a_strided_output_is_handed_over_in_its_own_order() {
        let dev = Device::Cpu;
        let a = Var::from_tensor(&Tensor::arange(0f32, 6., &dev).unwrap()).unwrap();
        let y = a.as_tensor().detach().reshape((2, 3)).unwrap().t().unwrap();
        let h = attach(y.clone(), &[a.as_tensor()], Product).unwrap();
        assert_eq!(h.to_vec2::<f32>().unwrap(), y.to_vec2::<f32>().unwrap());
    }
}
