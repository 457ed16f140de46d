//! Fuzzes the GGUF container reader and the MoE layer loader on top of it: any bytes must
//! parse or give a clean error, never a panic, a hang or an absurd allocation; every
//! tensor of a file that parses must have exactly the bytes its dims and type call for; and
//! a layer that loads must pass its own check.
//!
//! RUSTC_BOOTSTRAP=1 cargo fuzz run gguf   (cargo-fuzz needs nightly's -Z flags)
#![no_main]

use libfuzzer_sys::fuzz_target;
use switch_moe::gguf::{ggml_block_size, GgufFile};
use switch_moe::MoeWeights;

fuzz_target!(|data: &[u8]| {
    if let Ok((weights, _)) = MoeWeights::from_gguf_bytes(data, None, "fuzz input") {
        weights.check().expect("a loaded layer must pass its own check");
    }
    let Ok(file) = GgufFile::parse(data, "fuzz input") else {
        return;
    };
    assert!(file.alignment.is_power_of_two());
    for tensor in &file.tensors {
        let (values, bytes) =
            ggml_block_size(tensor.type_id).expect("a parsed tensor has a known type");
        let elements = tensor
            .dims
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d))
            .expect("dims fit in u64");
        assert_eq!(
            elements % values,
            0,
            "tensor `{}`: not whole blocks",
            tensor.name
        );
        let expected = (elements / values)
            .checked_mul(bytes)
            .expect("byte size fits in u64");
        assert_eq!(
            tensor.data.len() as u64,
            expected,
            "tensor `{}`",
            tensor.name
        );
        assert_eq!(
            file.tensor(&tensor.name).map(|t| t.data.as_ptr()),
            Some(tensor.data.as_ptr())
        );
    }
});
