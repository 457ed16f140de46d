//! Fuzzes the weight and config loaders: any bytes must give weights or a clean error,
//! never a panic, a hang or an absurd allocation.
//!
//! RUSTC_BOOTSTRAP=1 cargo fuzz run loaders   (cargo-fuzz needs nightly's -Z flags)
#![no_main]

use libfuzzer_sys::fuzz_target;
use switch_moe::{MoeConfig, MoeWeights, Naming};

const NAMINGS: [Naming; 5] = [Naming::Auto, Naming::Native, Naming::Labml, Naming::HfSwitch, Naming::HfMixtral];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    if selector & 1 == 0 {
        if let Ok(text) = std::str::from_utf8(rest) {
            if let Ok(config) = MoeConfig::from_json_str(text) {
                let _ = config.validate_for_experts(1 + (selector as usize >> 4));
            }
        }
    } else {
        let naming = NAMINGS[(selector as usize >> 1) % NAMINGS.len()];
        let prefix = (selector & 0x80 != 0).then_some("layer.");
        if let Ok(weights) = MoeWeights::from_safetensors_bytes(rest, naming, prefix, "fuzz input") {
            weights.check().expect("loaded weights must pass their own check");
        }
    }
});
