//! Waiting for a buffer mapping, blocking or async. Blocking waits let wgpu block in
//! `device.poll`; async waits yield to the executor: in a browser the event loop completes
//! the mapping, natively each poll of the future polls the device without blocking.

use std::future::poll_fn;
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};

use crate::error::{MoeError, Result};

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
