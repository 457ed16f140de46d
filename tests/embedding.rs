//! What applications embedding the layer rely on: a caller's device, the async forward,
//! `Send + Sync` with concurrent forwards, and a steady state that allocates nothing.

mod common;

use std::sync::Arc;

use common::*;
use switch_moe::{MoeConfig, MoeLayer, MoeOutput, MoeWeights};

fn assert_send_sync<T: Send + Sync>() {}

#[test]
fn layer_is_send_and_sync() {
    assert_send_sync::<MoeLayer>();
    assert_send_sync::<switch_moe::GpuContext>();
}

fn small_layer(context: &switch_moe::GpuContext) -> (MoeLayer, MoeConfig) {
    let weights = MoeWeights::random(shape(8, 16, 32), false, true, 90);
    let config = MoeConfig {
        capacity_factor: 0.9,
        ..config(2)
    };
    let layer = MoeLayer::from_device(
        &context.device,
        &context.queue,
        config.clone(),
        &weights,
        Default::default(),
    )
    .expect("layer on the caller's device");
    (layer, config)
}

#[test]
fn async_forward_equals_blocking_forward() {
    let context = gpu();
    let (layer, _) = small_layer(&context);
    let x = tokens(100, 16, 91);
    let blocking = layer.forward(&x, &[100, 16]).unwrap();
    let asynchronous = pollster::block_on(layer.forward_async(&x, &[100, 16])).unwrap();
    assert_eq!(asynchronous, blocking);
}

#[test]
fn concurrent_forwards_match_a_serial_run() {
    const THREADS: usize = 8;
    const FORWARDS: usize = 50;
    let context = gpu();
    let (layer, _) = small_layer(&context);
    let layer = Arc::new(layer);
    let inputs: Vec<Vec<f32>> = (0..THREADS)
        .map(|t| tokens(64 + 8 * t, 16, 100 + t as u64))
        .collect();
    let serial: Vec<MoeOutput> = inputs
        .iter()
        .map(|x| layer.forward(x, &[x.len() / 16, 16]).unwrap())
        .collect();
    std::thread::scope(|scope| {
        for (t, x) in inputs.iter().enumerate() {
            let layer = Arc::clone(&layer);
            let expected = &serial[t];
            scope.spawn(move || {
                for _ in 0..FORWARDS {
                    let output = layer.forward(x, &[x.len() / 16, 16]).unwrap();
                    assert_eq!(&output, expected, "thread {t}");
                }
            });
        }
    });
}

/// Resident set size of this process, in bytes (Linux), if known.
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

#[test]
fn soak_allocates_nothing_in_steady_state() {
    let context = gpu();
    let (layer, _) = small_layer(&context);
    let x = tokens(48, 16, 120);
    let expected = layer.forward(&x, &[48, 16]).unwrap();
    for _ in 0..100 {
        layer.forward(&x, &[48, 16]).unwrap();
    }
    let allocations = layer.scratch_allocations();
    let bytes = layer.scratch_bytes();
    let resident_before = resident_bytes();
    for i in 0..2000 {
        let output = layer.forward(&x, &[48, 16]).unwrap();
        if i % 500 == 0 {
            assert_eq!(output, expected);
        }
    }
    assert_eq!(
        layer.scratch_allocations(),
        allocations,
        "scratch buffers were reallocated"
    );
    assert_eq!(layer.scratch_bytes(), bytes);
    if let (Some(before), Some(after)) = (resident_before, resident_bytes()) {
        // Allocator noise is a few MiB at most; a per-forward leak of even 4 KiB would be 8 MiB.
        let growth = after.saturating_sub(before);
        assert!(
            growth < 8 << 20,
            "resident memory grew by {growth} bytes over 2000 forwards"
        );
    }
    // A smaller batch reuses the buffers; a larger one grows them once.
    layer.forward(&x[..16 * 16], &[16, 16]).unwrap();
    assert_eq!(layer.scratch_allocations(), allocations);
    let larger = tokens(300, 16, 121);
    layer.forward(&larger, &[300, 16]).unwrap();
    layer.forward(&larger, &[300, 16]).unwrap();
    assert_eq!(layer.scratch_allocations(), allocations + 1);
}
