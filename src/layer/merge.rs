//! Folding the active adapters into the weight for inference, and taking them out again.

use super::handle::{FourierLinear, State};
use crate::error::{Error, Result};
use candle_core::{DType, Tensor};

impl FourierLinear {
    /// `weight + sign·Σ ΔW` over `names`, outside the autograd graph (merge and unmerge). For an
    /// f32 CPU weight each adapter is added in one fused pass, without a ΔW buffer.
    fn merged_weight(&self, st: &State, names: &[String], sign: f64) -> Result<Tensor> {
        // Work on the (out, in) view; fan_in_fan_out weights are transposed back at the end.
        let mut w = self.weight_out_in(&st.weight)?;
        for name in names {
            let adapter = st
                .adapters
                .get(name)
                .ok_or_else(|| self.unknown(st, name))?;
            let c = adapter.spectrum.as_tensor();
            w = adapter.op.add_to(&w, c, sign * adapter.scaling)?;
        }
        Ok(if self.fan_in_fan_out {
            w.t()?.contiguous()?
        } else {
            w
        })
    }

    /// Folds the active, not yet merged adapters into the weight. Forward then uses the merged
    /// weight only. Non-finite values are not checked: see [`safe_merge`](Self::safe_merge).
    pub fn merge(&self) -> Result<()> {
        self.merge_checked(false)
    }

    /// Like [`merge`](Self::merge), but returns [`Error::NonFinite`] and leaves the weight
    /// untouched if the merged weight has any NaN or infinite value.
    pub fn safe_merge(&self) -> Result<()> {
        self.merge_checked(true)
    }

    fn merge_checked(&self, check: bool) -> Result<()> {
        let mut st = self.write();
        if st.disabled {
            return Err(Error::MergeState {
                what: self.name.clone(),
                message: "cannot merge while adapters are disabled".into(),
            });
        }
        let todo: Vec<String> = st
            .active
            .iter()
            .filter(|a| !st.merged.contains(a))
            .cloned()
            .collect();
        if todo.is_empty() {
            return Ok(());
        }
        let merged = self.merged_weight(&st, &todo, 1.0)?;
        if check && !all_finite(&merged)? {
            return Err(Error::NonFinite {
                what: self.name.clone(),
                adapters: todo,
            });
        }
        st.weight = merged;
        st.merged.extend(todo);
        Ok(())
    }

    /// Takes every merged adapter out of the weight again (W = W − Σ ΔW, with the current
    /// coefficients).
    pub fn unmerge(&self) -> Result<()> {
        let mut st = self.write();
        if st.merged.is_empty() {
            return Ok(());
        }
        st.weight = self.merged_weight(&st, &st.merged, -1.0)?;
        st.merged.clear();
        Ok(())
    }

    /// Whether any adapter is merged into the weight.
    pub fn is_merged(&self) -> bool {
        !self.read().merged.is_empty()
    }

    /// Names of the merged adapters.
    pub fn merged_adapters(&self) -> Vec<String> {
        self.read().merged.clone()
    }
}

/// Whether every value of `t` is finite.
fn all_finite(t: &Tensor) -> Result<bool> {
    let t = t.to_dtype(DType::F32)?;
    // 0·x is 0 for finite x and NaN for ±inf or NaN.
    let s = t.affine(0.0, 0.0)?.sum_all()?.to_scalar::<f32>()?;
    Ok(s == 0.0)
}
