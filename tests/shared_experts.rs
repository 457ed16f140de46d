//! Shared experts' tensors: native names through safetensors and back, bad tensors named,
//! and the GPU layer's refusal (it does not run them yet) naming the tensor. Their forward
//! and backward are checked in cpu_backward.rs (finite differences) and against
//! transformers' blocks in family_fixtures.rs.

mod common;

use common::*;
use switch_moe::weights::SharedExpert;
use switch_moe::{MoeConfig, MoeError, MoeLayer, MoeWeights, Naming};

fn layer_with_shared(gated: bool) -> MoeWeights {
    let mut weights = MoeWeights::random(shape(4, 8, 6), gated, true, 51);
    weights.shared = Some(SharedExpert::random((8, 10), gated, true, true, 52));
    weights
}

#[test]
fn shared_tensors_round_trip_through_safetensors() {
    let weights = layer_with_shared(true);
    let bytes = weights.to_safetensors_bytes().unwrap();
    let read = MoeWeights::from_safetensors_bytes(&bytes, Naming::Auto, None, "mem").unwrap();
    assert_eq!(read, weights);
    let st = switch_moe::tensor_io::parse_safetensors(&bytes, "mem").unwrap();
    assert_eq!(st.tensor("shared.gate").unwrap().shape(), &[1, 8]);
    assert_eq!(st.tensor("shared.w2").unwrap().shape(), &[8, 10]);
}

#[test]
fn bad_shared_tensors_are_errors_naming_them() {
    let mut weights = layer_with_shared(true);
    weights.shared.as_mut().unwrap().w3 = None;
    match weights.check() {
        Err(MoeError::Tensor { name, message }) => {
            assert_eq!(name, "shared.w3");
            assert!(message.contains("gated"), "{message}");
        }
        other => panic!("expected a shared.w3 error, got {other:?}"),
    }
    let mut weights = layer_with_shared(false);
    weights.shared.as_mut().unwrap().w2.pop();
    assert!(matches!(weights.check(), Err(MoeError::Tensor { name, .. }) if name == "shared.w2"));
    let mut weights = layer_with_shared(false);
    weights.shared.as_mut().unwrap().gate.as_mut().unwrap()[3] = f32::NAN;
    assert!(matches!(weights.check(), Err(MoeError::Tensor { name, .. }) if name == "shared.gate"));
}

#[test]
fn the_gpu_layer_refuses_shared_experts_by_name() {
    let weights = layer_with_shared(false);
    match MoeLayer::new(&gpu(), MoeConfig::default(), &weights) {
        Err(MoeError::Tensor { name, message }) => {
            assert_eq!(name, "shared.w1");
            assert!(message.contains("CPU reference"), "{message}");
        }
        Err(other) => panic!("expected a shared.w1 error, got {other}"),
        Ok(_) => panic!("the GPU layer took a shared expert"),
    }
}
