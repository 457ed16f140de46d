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

/// Reads a buffer back (test helper; the layer's buffer-level forward reads nothing back).
#[test]
fn buffer_level_forward_into_the_callers_encoder() {
    use switch_moe::gpu::StatisticsLayout;
    let context = gpu();
    let (layer, config) = small_layer(&context);
    let (t, d, n, k) = (100usize, 16usize, 8usize, config.top_k);
    let x_values = tokens(t, d, 130);
    let expected = layer.forward(&x_values, &[t, d]).unwrap();

    let caller =
        wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::STORAGE;
    let x = buffer_with(&context, &x_values, caller);
    let y = buffer_with(&context, &vec![0.0; t * d], caller);
    let layout = StatisticsLayout::new(t, k, n);
    let statistics = buffer_with(&context, &vec![0.0; layout.words], caller);
    let mut encoder = context.device.create_command_encoder(&Default::default());
    layer
        .encode_forward(&mut encoder, &x, &y, Some(&statistics), t)
        .unwrap();
    // Another forward runs between encoding and submitting: the encoded one must not care.
    let other = tokens(40, d, 131);
    layer.forward(&other, &[40, d]).unwrap();
    context.queue.submit([encoder.finish()]);

    let y_words = read_words(&context, &y);
    let stats = read_words(&context, &statistics);
    let floats = |words: &[u32]| words.iter().map(|w| f32::from_bits(*w)).collect::<Vec<_>>();
    assert_eq!(floats(&y_words), expected.y);
    assert_eq!(&stats[layout.routes..layout.gates], &expected.routes[..]);
    assert_eq!(
        floats(&stats[layout.gates..layout.route_prob_max]),
        expected.gates
    );
    assert_eq!(
        floats(&stats[layout.route_prob_max..layout.counts]),
        expected.route_prob_max
    );
    assert_eq!(&stats[layout.counts..layout.kept], &expected.counts[..]);
    assert_eq!(&stats[layout.kept..layout.n_dropped], &expected.kept[..]);
    assert_eq!(stats[layout.n_dropped], expected.n_dropped);
    assert_eq!(
        floats(&stats[layout.route_prob_sum..layout.aux_loss]),
        expected.route_prob_sum
    );
    assert_eq!(f32::from_bits(stats[layout.aux_loss]), expected.aux_loss);
    assert_eq!(f32::from_bits(stats[layout.z_loss]), expected.z_loss);
    assert_eq!(stats[layout.first_non_finite_token], u32::MAX);

    // A non-finite token is reported in the statistics, not as an error.
    let mut bad = x_values.clone();
    bad[7 * d + 2] = f32::INFINITY;
    let x_bad = buffer_with(&context, &bad, caller);
    let mut encoder = context.device.create_command_encoder(&Default::default());
    layer
        .encode_forward(&mut encoder, &x_bad, &y, Some(&statistics), t)
        .unwrap();
    context.queue.submit([encoder.finish()]);
    assert_eq!(
        read_words(&context, &statistics)[layout.first_non_finite_token],
        7
    );

    // Buffers too small are errors naming the buffer.
    let mut encoder = context.device.create_command_encoder(&Default::default());
    let small = buffer_with(&context, &[0.0; 4], caller);
    match layer.encode_forward(&mut encoder, &x, &small, None, t) {
        Err(switch_moe::MoeError::InputShape { message }) => {
            assert!(message.contains("`y`"), "{message}")
        }
        other => panic!("expected an input error, got {other:?}"),
    }
}

#[test]
fn concurrent_async_forwards_on_one_thread() {
    use std::future::Future;
    use std::task::Poll;
    let context = gpu();
    let (layer, _) = small_layer(&context);
    let (x1, x2) = (tokens(64, 16, 140), tokens(96, 16, 141));
    let expected = (
        layer.forward(&x1, &[64, 16]).unwrap(),
        layer.forward(&x2, &[96, 16]).unwrap(),
    );
    // Both futures are in flight at once on one thread: each must get its own buffers.
    let mut first = Box::pin(layer.forward_async(&x1, &[64, 16]));
    let mut second = Box::pin(layer.forward_async(&x2, &[96, 16]));
    let (mut a, mut b) = (None, None);
    pollster::block_on(std::future::poll_fn(|context| {
        if a.is_none() {
            if let Poll::Ready(output) = first.as_mut().poll(context) {
                a = Some(output);
            }
        }
        if b.is_none() {
            if let Poll::Ready(output) = second.as_mut().poll(context) {
                b = Some(output);
            }
        }
        if a.is_some() && b.is_some() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }));
    assert_eq!(a.unwrap().unwrap(), expected.0);
    assert_eq!(b.unwrap().unwrap(), expected.1);
}

#[test]
fn a_device_with_too_low_limits_is_named() {
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapter =
        pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions::default()))
            .expect("GPU tests need an adapter (see README, \"No GPU?\")");
    let limits = wgpu::Limits {
        max_storage_buffers_per_shader_stage: 4,
        ..wgpu::Limits::downlevel_defaults()
    };
    let descriptor = wgpu::DeviceDescriptor {
        required_limits: limits,
        ..Default::default()
    };
    let (device, queue) = pollster::block_on(adapter.request_device(&descriptor)).unwrap();
    let weights = MoeWeights::random(shape(4, 8, 8), false, false, 1);
    match MoeLayer::from_device(&device, &queue, config(1), &weights, Default::default()) {
        Err(switch_moe::MoeError::DeviceLimit {
            limit,
            needed,
            allowed,
        }) => {
            assert_eq!(limit, "max_storage_buffers_per_shader_stage");
            assert_eq!((needed, allowed), (6, 4));
        }
        other => panic!("expected a device limit error, got {:?}", other.map(|_| ())),
    }
}
