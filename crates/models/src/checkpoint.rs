//! Gradient checkpointing: run a block forward without keeping its intermediate tensors, and
//! run it again during the backward to get its gradients.
//!
//! candle keeps every tensor an op saved for its backward until the whole backward ends, so a
//! training step's peak memory holds every activation of the UNet. A checkpointed block keeps
//! only its inputs: its forward runs on detached inputs (the graph it builds is dropped at
//! once) and its output enters the outer graph through one op whose backward recomputes the
//! block with a graph, differentiates it against the incoming gradient and hands back the
//! gradients of the block's input, its second input and its trainable parameters. The cost is
//! one more forward of each checkpointed block per step.
//!
//! The recomputation sees the same parameter values and the same deterministic kernels, so a
//! block's gradients are those of the plain backward bit for bit; in a whole UNet a tensor that
//! feeds several blocks may sum its gradients in another order (float rounding, which the
//! tests bound). The block's output enters the graph through [`ops::handoff`], so this works on
//! every device.

use std::sync::Arc;

use candle_core::{Tensor, Var};
use ops::handoff::{self, Backward};

use crate::Result;

/// A block's forward from its input and one more tensor (the time embedding of a resnet, the
/// text context of a transformer).
pub(crate) type BlockFn = Arc<dyn Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync>;

/// `f(x, aux)`, checkpointed: nothing inside `f` stays alive for the backward. `params` are the
/// trainable variables `f` uses (their gradients come back through this op). Runs `f` plainly
/// when nothing needs a gradient. Every device: the output enters the graph through
/// [`ops::handoff`].
pub(crate) fn checkpoint(f: BlockFn, x: &Tensor, aux: &Tensor, params: Vec<Var>) -> Result<Tensor> {
    let tracked = x.track_op() || aux.track_op() || !params.is_empty();
    if !tracked {
        return f(x, aux);
    }
    let y = f(&x.detach(), &aux.detach())?.detach();
    let packed = if params.is_empty() {
        Tensor::zeros(1, x.dtype(), x.device())?
    } else {
        let flat = params
            .iter()
            .map(|v| v.as_tensor().flatten_all())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&flat, 0)?
    };
    Ok(handoff::attach(
        y,
        &[x, aux, &packed],
        Checkpoint { f, params },
    )?)
}

/// The backward of a checkpointed block: its forward again, with a graph, differentiated
/// against the incoming gradient.
struct Checkpoint {
    f: BlockFn,
    params: Vec<Var>,
}

fn wrap(e: crate::Error) -> candle_core::Error {
    candle_core::Error::Msg(format!("checkpointed block: {e}"))
}

impl Backward for Checkpoint {
    fn name(&self) -> &'static str {
        "atomtune-checkpoint"
    }

    fn backward(
        &self,
        inputs: &[&Tensor],
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<Vec<Option<Tensor>>> {
        let &[x, aux, packed] = inputs else {
            candle_core::bail!("atomtune-checkpoint: three inputs expected");
        };
        let leaf = |t: &Tensor| -> candle_core::Result<(Tensor, Option<Var>)> {
            if t.track_op() {
                let v = Var::from_tensor(&t.detach())?;
                Ok((v.as_tensor().clone(), Some(v)))
            } else {
                Ok((t.detach(), None))
            }
        };
        let (xin, xv) = leaf(x)?;
        let (ain, av) = leaf(aux)?;
        let y = (self.f)(&xin, &ain).map_err(wrap)?;
        let grads = (y * dy.detach())?.sum_all()?.backward()?;
        let grad_of = |v: &Option<Var>| -> candle_core::Result<Option<Tensor>> {
            Ok(match v {
                Some(v) => Some(match grads.get(v) {
                    Some(g) => g.clone(),
                    None => v.as_tensor().zeros_like()?,
                }),
                None => None,
            })
        };
        let dp = if packed.track_op() {
            let flat = self
                .params
                .iter()
                .map(|v| match grads.get(v) {
                    Some(g) => g.flatten_all(),
                    None => v.as_tensor().zeros_like()?.flatten_all(),
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            Some(Tensor::cat(&flat, 0)?)
        } else {
            None
        };
        Ok(vec![grad_of(&xv)?, grad_of(&av)?, dp])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// A small block with a parameter, a nonlinearity and both inputs.
    fn block(w: Var) -> BlockFn {
        Arc::new(move |x: &Tensor, a: &Tensor| {
            let h = x.broadcast_mul(w.as_tensor())?.silu()?;
            Ok((h.broadcast_add(a)?.sqr()? + x)?)
        })
    }

    fn block_plain(x: &Tensor) -> Vec<Vec<f32>> {
        let w = Var::from_tensor(&Tensor::ones((1, 2), DType::F32, x.device()).unwrap()).unwrap();
        block(w)(x, x).unwrap().to_vec2::<f32>().unwrap()
    }

    #[test]
    fn checkpointed_gradients_equal_the_plain_ones_bit_for_bit() {
        for kernels in ops::Kernels::ALL {
            kernels.scope(gradients_equal_the_plain_ones);
        }
    }

    fn gradients_equal_the_plain_ones() {
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, 5), &dev).unwrap()).unwrap();
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 5), &dev).unwrap()).unwrap();
        let a = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, 5), &dev).unwrap()).unwrap();
        let m = Tensor::randn(0f32, 1.0, (3, 5), &dev).unwrap();
        let f = block(w.clone());
        // Something before the block, so that the input is an inner node of the graph.
        let xin = (x.as_tensor() * 2.0).unwrap();
        let plain = f(&xin, &a).unwrap();
        let ckpt = checkpoint(f.clone(), &xin, &a, vec![w.clone()]).unwrap();
        let (p, c) = (
            plain.to_vec2::<f32>().unwrap(),
            ckpt.to_vec2::<f32>().unwrap(),
        );
        assert_eq!(p, c);
        let gp = (plain * &m).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = (ckpt * &m).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, v) in [("w", &w), ("x", &x), ("aux", &a)] {
            let (p, c) = (gp.get(v).unwrap(), gc.get(v).unwrap());
            let (p, c) = (
                p.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                c.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            assert_eq!(p, c, "d{name}");
        }
    }

    /// With no tracked input and no parameter named, the block runs as it is (its own graph,
    /// here from the variable it closes over, is kept: no checkpoint op stands in between).
    #[test]
    fn blocks_without_tracked_inputs_run_plainly() {
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::ones((1, 2), DType::F32, &dev).unwrap()).unwrap();
        let x = Tensor::ones((2, 2), DType::F32, &dev).unwrap();
        let y = checkpoint(block(w), &x, &x, vec![]).unwrap();
        assert!(y.track_op());
        assert_eq!(y.to_vec2::<f32>().unwrap(), block_plain(&x));
    }
}
