//! `GpuContext`: the adapter, device and queue the layer runs on.
//!
//! The adapter is chosen from the environment as wgpu's own tools do: `WGPU_BACKEND`
//! (vulkan, gl, metal, dx12, ...), `WGPU_ADAPTER_NAME` (a case-insensitive substring of
//! the adapter's name) and `WGPU_POWER_PREF` (low, high, none; high by default). The
//! device is requested with the adapter's own limits, since WebGPU's defaults (128 MiB
//! bindings, 16 KiB of workgroup memory) are far below what most GPUs offer.

use std::fmt;
use std::sync::Arc;

use crate::error::{MoeError, Result};
use crate::gpu::device::shared_values::SharedValues;

/// How to get a GPU adapter on a machine without one; part of every "no adapter" error.
pub const SOFTWARE_ADAPTER_HINT: &str = "on a machine without a GPU, install Mesa's software \
     Vulkan driver (lavapipe): `apt-get install -y mesa-vulkan-drivers libvulkan1` \
     (see README, \"No GPU?\")";

/// Features the layer uses when the adapter has them (none is required).
fn optional_features() -> wgpu::Features {
    wgpu::Features::TIMESTAMP_QUERY
}

/// A wgpu device and queue, with the adapter they come from. The layers built on one
/// context (and its clones) share the pipelines they would each build alike.
#[derive(Clone, Debug)]
pub struct GpuContext {
    pub adapter: wgpu::Adapter,
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    /// What its layers share (their pipelines, by what they depend on).
    pub(crate) shared: Arc<SharedValues>,
}

/// What the adapter is, for printing and for benchmark records.
#[derive(Clone, Debug)]
pub struct AdapterSummary {
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
}

impl fmt::Display for AdapterSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}, {}", self.name, self.backend, self.device_type)?;
        if !self.driver.is_empty() {
            write!(f, ", {}", self.driver)?;
        }
        write!(f, ")")
    }
}

impl GpuContext {
    /// The best adapter the environment allows (see the module docs), blocking.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn new() -> Result<Self> {
        pollster::block_on(Self::new_async())
    }

    /// The best adapter the environment allows (see the module docs).
    pub async fn new_async() -> Result<Self> {
        let instance =
            wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let adapter = match std::env::var("WGPU_ADAPTER_NAME") {
            Ok(wanted) if !wanted.is_empty() => Self::adapter_by_name(&instance, &wanted).await?,
            _ => {
                let options = wgpu::RequestAdapterOptions {
                    power_preference: wgpu::PowerPreference::from_env()
                        .unwrap_or(wgpu::PowerPreference::HighPerformance),
                    force_fallback_adapter: false,
                    compatible_surface: None,
                    apply_limit_buckets: false,
                };
                instance
                    .request_adapter(&options)
                    .await
                    .map_err(|e| MoeError::NoAdapter {
                        message: format!("{e}; {SOFTWARE_ADAPTER_HINT}"),
                    })?
            }
        };
        Self::from_adapter(adapter).await
    }

    async fn adapter_by_name(instance: &wgpu::Instance, wanted: &str) -> Result<wgpu::Adapter> {
        let adapters = instance.enumerate_adapters(wgpu::Backends::all()).await;
        let names: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
        let wanted_lower = wanted.to_lowercase();
        adapters
            .into_iter()
            .find(|a| a.get_info().name.to_lowercase().contains(&wanted_lower))
            .ok_or_else(|| MoeError::NoAdapter {
                message: format!(
                    "WGPU_ADAPTER_NAME={wanted:?} matches none of the adapters {names:?}; \
                     {SOFTWARE_ADAPTER_HINT}"
                ),
            })
    }

    /// Opens a device on `adapter` with the adapter's limits and the optional features it has.
    pub async fn from_adapter(adapter: wgpu::Adapter) -> Result<Self> {
        let descriptor = wgpu::DeviceDescriptor {
            label: Some("switch-moe device"),
            required_features: adapter.features() & optional_features(),
            required_limits: adapter.limits(),
            ..Default::default()
        };
        let (device, queue) =
            adapter
                .request_device(&descriptor)
                .await
                .map_err(|e| MoeError::Device {
                    message: format!("cannot open a device on {}: {e}", adapter.get_info().name),
                })?;
        // wgpu's default handler panics; errors are caught per forward with error scopes,
        // so anything reaching this handler is logged instead of aborting the application.
        device.on_uncaptured_error(Arc::new(|error: wgpu::Error| {
            log::error!("uncaptured wgpu error: {error}");
        }));
        Ok(GpuContext {
            adapter,
            device,
            queue,
            shared: Arc::new(SharedValues::new()),
        })
    }

    /// Name, backend, device type and driver of the adapter.
    pub fn adapter_summary(&self) -> AdapterSummary {
        let info = self.adapter.get_info();
        AdapterSummary {
            name: info.name,
            backend: format!("{:?}", info.backend),
            device_type: format!("{:?}", info.device_type),
            driver: format!("{} {}", info.driver, info.driver_info)
                .trim()
                .to_string(),
        }
    }
}
