//! Parses an adapter whose tensors are PEFT's `adapter_model.bin` (a `torch.save` zip archive),
//! as `PeftAdapter::load` does when there is no `adapter_model.safetensors`. Must never panic,
//! hang or over-allocate (candle's pickle reader only sees streams the crate's prescan accepts);
//! a successful parse must uphold the adapter's invariants.
#![no_main]

use candle_core::DType;
use fourierft::peft::PeftAdapter;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((config, weights)) = fourierft_fuzz::split2(data) else {
        return;
    };
    match PeftAdapter::from_bin_bytes(config, weights) {
        Ok(adapter) => {
            assert!(!adapter.spectra().is_empty());
            for (path, t) in adapter.spectra() {
                assert!(adapter.matcher().is_target(path), "{path}");
                assert_eq!(t.dtype(), DType::F32);
                assert_eq!(t.dims(), [adapter.matcher().n_frequency(path)]);
                let v = t.to_vec1::<f32>().expect("f32 spectrum");
                assert!(v.iter().all(|x| x.is_finite()));
            }
            let _ = adapter.num_coefficients();
        }
        Err(e) => {
            // Formatting the error must not panic either, and stays one line.
            let m = e.to_string();
            assert!(!m.contains('\n'), "{m}");
        }
    }
});
