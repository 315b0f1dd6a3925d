//! The query and value projections: frozen, FourierFT or a minimal LoRA (the baseline).

use anyhow::Result;
use candle_core::{DType, Module, Tensor, Var};
use candle_nn::VarBuilder;
use fourierft::FourierLinear;
use rand::{Rng, SeedableRng};

use crate::config::{Adapter, LoraConfig};
use crate::linear::FrozenLinear;
use crate::storage::{as_rows, reshaped};

/// LoRA on a frozen linear layer.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    pub(crate) base: FrozenLinear,
    a: Var, // (r, in)
    b: Var, // (out, r)
    scale: f64,
}

impl LoraLinear {
    pub fn new(base: FrozenLinear, cfg: &LoraConfig, name: &str) -> Result<Self> {
        let (out, inp) = base.weight.dims2()?;
        let dev = base.weight.device().clone();
        // Kaiming-uniform with a = sqrt(5) (PEFT / torch Linear default): U(-1/sqrt(in), 1/sqrt(in)).
        let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed ^ fnv1a(name));
        let bound = 1.0 / (inp as f32).sqrt();
        let a: Vec<f32> = (0..cfg.r * inp)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        Ok(Self {
            base,
            a: Var::from_tensor(&Tensor::from_vec(a, (cfg.r, inp), &dev)?)?,
            b: Var::zeros((out, cfg.r), DType::F32, &dev)?,
            scale: cfg.alpha / cfg.r as f64,
        })
    }

    pub fn vars(&self) -> Vec<Var> {
        vec![self.a.clone(), self.b.clone()]
    }

    pub fn num_trainable(&self) -> usize {
        self.a.elem_count() + self.b.elem_count()
    }
}

impl Module for LoraLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.base.forward(x)?;
        let x2 = as_rows(x)?;
        let up = x2
            .matmul(&self.a.as_tensor().t()?)?
            .matmul(&self.b.as_tensor().t()?)?;
        let up = reshaped(&(up * self.scale)?, y.dims())?;
        y + up
    }
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A query or value projection.
#[derive(Debug, Clone)]
pub enum Proj {
    Frozen(FrozenLinear),
    Fourier(FourierLinear),
    Lora(LoraLinear),
}

impl Proj {
    pub(crate) fn load(dim: usize, adapter: &Adapter, vb: VarBuilder) -> Result<Self> {
        Ok(match adapter {
            Adapter::None => Proj::Frozen(FrozenLinear::load(dim, dim, vb)?),
            Adapter::FourierFT(cfg) => Proj::Fourier(fourierft::linear(dim, dim, cfg, vb)?),
            Adapter::Lora(cfg) => {
                let name = vb.prefix();
                Proj::Lora(LoraLinear::new(
                    FrozenLinear::load(dim, dim, vb)?,
                    cfg,
                    &name,
                )?)
            }
        })
    }

    pub fn vars(&self) -> Vec<Var> {
        match self {
            Proj::Frozen(_) => vec![],
            Proj::Fourier(l) => l.trainable_vars(),
            Proj::Lora(l) => l.vars(),
        }
    }

    pub fn num_trainable(&self) -> usize {
        match self {
            Proj::Frozen(_) => 0,
            Proj::Fourier(l) => l.num_trainable(),
            Proj::Lora(l) => l.num_trainable(),
        }
    }
}

impl Module for Proj {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Proj::Frozen(l) => l.forward(x),
            Proj::Fourier(l) => l.forward(x),
            Proj::Lora(l) => l.forward(x),
        }
    }
}
