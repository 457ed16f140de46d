//! Reading buffers back to the host: copies into a staging buffer, and the wait for its
//! mapping, blocking or async. Blocking waits let wgpu block in `device.poll`; async waits
//! yield to the executor: in a browser the event loop completes the mapping, natively each
//! poll of the future polls the device without blocking.

use std::future::poll_fn;
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};

use crate::error::{MoeError, Result};
use crate::gpu::device::allocate::staging_buffer;

/// How a read-back waits for the GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Block the calling thread in `device.poll` (native only).
    Block,
    /// Return to the executor until the mapping completes.
    Yield,
}

#[derive(Default)]
struct MapState {
    result: Option<std::result::Result<(), wgpu::BufferAsyncError>>,
    waker: Option<Waker>,
}

/// Maps `slice` for reading and waits until it is mapped.
pub async fn map_for_reading(
    device: &wgpu::Device,
    slice: wgpu::BufferSlice<'_>,
    wait: Wait,
) -> Result<()> {
    let state = Arc::new(Mutex::new(MapState::default()));
    let callback_state = Arc::clone(&state);
    slice.map_async(wgpu::MapMode::Read, move |result| {
        if let Ok(mut state) = callback_state.lock() {
            state.result = Some(result);
            if let Some(waker) = state.waker.take() {
                waker.wake();
            }
        }
    });
    if wait == Wait::Block {
        device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| MoeError::Device {
                message: format!("waiting for the GPU: {e}"),
            })?;
    }
    let result = poll_fn(|context| {
        let Ok(mut guard) = state.lock() else {
            return Poll::Ready(None);
        };
        if let Some(result) = guard.result.take() {
            return Poll::Ready(Some(result));
        }
        guard.waker = Some(context.waker().clone());
        drop(guard);
        if cfg!(not(target_arch = "wasm32")) {
            // Natively nothing else drives the device: poll it without blocking and ask
            // to be polled again.
            let _ = device.poll(wgpu::PollType::Poll);
            context.waker().wake_by_ref();
        }
        Poll::Pending
    })
    .await;
    match result {
        Some(Ok(())) => Ok(()),
        Some(Err(e)) => Err(MoeError::Device {
            message: format!("mapping the read-back buffer: {e}"),
        }),
        None => Err(MoeError::Device {
            message: "the read-back state was poisoned".to_string(),
        }),
    }
}

/// Splits `words` into consecutive pieces of `lengths`.
pub(crate) fn split_words<'a>(words: &'a [u32], lengths: &[usize]) -> Vec<&'a [u32]> {
    let mut rest = words;
    lengths
        .iter()
        .map(|length| {
            let (head, tail) = rest.split_at((*length).min(rest.len()));
            rest = tail;
            head
        })
        .collect()
}

/// Waits until the first `bytes` of `staging` are mapped and returns them as words.
pub(crate) async fn read_mapped(
    device: &wgpu::Device,
    staging: &wgpu::Buffer,
    bytes: u64,
    wait: Wait,
) -> Result<Vec<u32>> {
    let slice = staging.slice(..bytes.max(4));
    map_for_reading(device, slice, wait).await?;
    let words = {
        let view = slice.get_mapped_range().map_err(|e| MoeError::Device {
            message: format!("reading the read-back buffer: {e}"),
        })?;
        bytemuck::pod_collect_to_vec::<u8, u32>(&view[..bytes as usize])
    };
    staging.unmap();
    Ok(words)
}

/// Copies `sources` (buffer, 4-byte words from its start) one after the other into
/// `staging`, finishes `encoder` and submits it; returns the bytes copied.
pub(crate) fn copy_and_submit(
    queue: &wgpu::Queue,
    mut encoder: wgpu::CommandEncoder,
    staging: &wgpu::Buffer,
    sources: &[(&wgpu::Buffer, usize)],
) -> u64 {
    let mut offset = 0u64;
    for (buffer, words) in sources {
        let bytes = (*words * 4) as u64;
        if bytes > 0 {
            encoder.copy_buffer_to_buffer(buffer, 0, staging, offset, bytes);
        }
        offset += bytes;
    }
    queue.submit([encoder.finish()]);
    offset
}

/// The first `floats` floats of `buffer` (which needs COPY_SRC), copied out in a
/// submission of their own and read back.
pub(crate) async fn read_floats(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    buffer: &wgpu::Buffer,
    floats: usize,
    wait: Wait,
) -> Result<Vec<f32>> {
    let bytes = (floats * 4) as u64;
    let staging = staging_buffer(device, "training read-back", bytes);
    let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
        label: Some("training read-back"),
    });
    encoder.copy_buffer_to_buffer(buffer, 0, &staging, 0, bytes);
    queue.submit([encoder.finish()]);
    let words = read_mapped(device, &staging, bytes, wait).await?;
    Ok(bytemuck::cast_slice(&words).to_vec())
}
