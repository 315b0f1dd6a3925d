//! Merges an adapter (config + safetensors bytes) into a base safetensors file in memory, as
//! `fourierft merge` does. Must never panic, hang or over-allocate; a successful merge must be a
//! valid safetensors file with every base tensor.
#![no_main]

use fourierft::peft::{merge_safetensors_bytes, PeftAdapter};
use libfuzzer_sys::fuzz_target;
use safetensors::SafeTensors;

fuzz_target!(|data: &[u8]| {
    let Some((config, adapter, base)) = fourierft_fuzz::split3(data) else {
        return;
    };
    let adapter = match PeftAdapter::from_bytes(config, adapter) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    match merge_safetensors_bytes(base, &adapter, "") {
        Ok((bytes, summary)) => {
            let merged = SafeTensors::deserialize(&bytes).expect("merged output parses");
            let input = SafeTensors::deserialize(base).expect("base parsed before");
            assert_eq!(merged.len(), input.len());
            assert_eq!(
                merged.len(),
                summary.merged.len() + summary.replaced.len() + summary.copied
            );
            for (name, _) in &summary.merged {
                let (a, b) = (merged.tensor(name), input.tensor(name));
                let (a, b) = (a.expect("merged tensor"), b.expect("base tensor"));
                assert_eq!((a.dtype(), a.shape()), (b.dtype(), b.shape()));
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
