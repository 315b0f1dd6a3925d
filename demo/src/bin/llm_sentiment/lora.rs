//! The LoRA baseline on the stock model, trained the way `fourierft::train::StockTrainer` trains
//! FourierFT (so the two differ only in the adapter): each adapted weight is a `Var` holding
//! `W0 + s·B·A` that the model is built with once; after `backward`, `dL/dW` becomes
//! `dL/dA = s·Bᵀ·dL/dW` and `dL/dB = s·dL/dW·Aᵀ`, AdamW steps `A` and `B`, and the weight is
//! rewritten. Initialised as PEFT's LoRA: `A ~ U(±1/√in)` (kaiming-uniform with a = √5), `B = 0`.

use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use candle_nn::Optimizer;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;

struct Layer {
    name: String,
    weight: Var,
    w0: Tensor,
    a: Var,
    b: Var,
}

/// LoRA on the weights whose names end in one of the target modules' `.weight`.
pub(crate) struct StockLora {
    layers: Vec<Layer>,
    scale: f64,
}

impl StockLora {
    /// Replaces each targeted weight in `tensors` with a trainable `Var` (starting at `W0`).
    pub(crate) fn new(
        tensors: &mut HashMap<String, Tensor>,
        targets: &[&str],
        r: usize,
        alpha: f64,
        seed: u64,
    ) -> Result<Self> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut names: Vec<String> = tensors
            .keys()
            .filter(|k| targets.iter().any(|t| k.ends_with(&format!(".{t}.weight"))))
            .cloned()
            .collect();
        names.sort();
        anyhow::ensure!(!names.is_empty(), "LoRA: no weight matches {targets:?}");
        let mut layers = Vec::new();
        for name in names {
            let w0 = tensors[&name].clone();
            let (out, inn) = w0.dims2()?;
            let bound = 1.0 / (inn as f32).sqrt();
            let a: Vec<f32> = (0..r * inn)
                .map(|_| rng.random_range(-bound..bound))
                .collect();
            let a = Var::from_tensor(&Tensor::from_vec(a, (r, inn), &Device::Cpu)?)?;
            let b = Var::zeros((out, r), w0.dtype(), w0.device())?;
            let weight = Var::from_tensor(&w0)?;
            tensors.insert(name.clone(), weight.as_tensor().clone());
            layers.push(Layer {
                name,
                weight,
                w0,
                a,
                b,
            });
        }
        Ok(Self {
            layers,
            scale: alpha / r as f64,
        })
    }

    /// `A` and `B` of every layer: the optimizer's parameters.
    pub(crate) fn vars(&self) -> Vec<Var> {
        self.layers
            .iter()
            .flat_map(|l| [l.a.clone(), l.b.clone()])
            .collect()
    }

    pub(crate) fn num_trainable(&self) -> usize {
        self.layers
            .iter()
            .map(|l| l.a.elem_count() + l.b.elem_count())
            .sum()
    }

    /// `loss.backward()` with `dL/dW` turned into `dL/dA`, `dL/dB` (no `dL/dW` left).
    pub(crate) fn grads(&self, loss: &Tensor) -> Result<GradStore> {
        // The subnormal policy StockTrainer::backward applies, so the two run the same way.
        fourierft::runtime::ensure_flush_policy();
        let mut grads = loss.backward()?;
        for l in &self.layers {
            let g = grads
                .remove(l.weight.as_tensor())
                .with_context(|| format!("LoRA: no gradient reached {}", l.name))?;
            let ga = (l.b.as_tensor().t()?.matmul(&g)? * self.scale)?;
            let gb = (g.matmul(&l.a.as_tensor().t()?)? * self.scale)?;
            grads.insert(l.a.as_tensor(), ga);
            grads.insert(l.b.as_tensor(), gb);
        }
        Ok(grads)
    }

    /// An optimizer step on `A`, `B`, and the weights rewritten.
    pub(crate) fn update<O: Optimizer>(&self, opt: &mut O, grads: &GradStore) -> Result<()> {
        opt.step(grads)?;
        for l in &self.layers {
            let delta = (l.b.as_tensor().matmul(l.a.as_tensor())? * self.scale)?;
            l.weight.set(&(&l.w0 + delta)?)?;
        }
        Ok(())
    }
}
