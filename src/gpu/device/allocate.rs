//! Allocation helpers that know nothing of MoE: storage, uniform and staging buffers, and
//! textures (with the layer counts the GL backend needs), plus the vec4 padding every
//! matrix row the kernels read as vec4s takes.

use wgpu::util::DeviceExt;

/// A storage buffer of at least `bytes` (never empty: wgpu cannot bind an empty buffer).
pub fn storage_buffer(
    device: &wgpu::Device,
    label: &str,
    bytes: u64,
    extra_usage: wgpu::BufferUsages,
) -> wgpu::Buffer {
    device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: bytes.max(4).next_multiple_of(4),
        usage: wgpu::BufferUsages::STORAGE | extra_usage,
        mapped_at_creation: false,
    })
}

/// A storage buffer holding `values` (a single 0 if `values` is empty).
pub fn storage_buffer_init<T: bytemuck::Pod + Default>(
    device: &wgpu::Device,
    label: &str,
    values: &[T],
    extra_usage: wgpu::BufferUsages,
) -> wgpu::Buffer {
    let fallback = [T::default()];
    let values = if values.is_empty() {
        &fallback[..]
    } else {
        values
    };
    device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some(label),
        contents: bytemuck::cast_slice(values),
        usage: wgpu::BufferUsages::STORAGE | extra_usage,
    })
}

/// A uniform buffer for a `Params` struct, written before each use.
pub fn uniform_buffer<T: bytemuck::Pod>(
    device: &wgpu::Device,
    label: &str,
    value: &T,
) -> wgpu::Buffer {
    device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some(label),
        contents: bytemuck::bytes_of(value),
        usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
    })
}

/// Layers `array_layers` may add to those needed.
const SPARE_LAYERS: u32 = 1;

/// Layers of content a texture array can hold on a device with `limits`.
pub(crate) fn usable_layers(limits: &wgpu::Limits) -> u32 {
    limits.max_texture_array_layers.saturating_sub(SPARE_LAYERS)
}

/// The most tokens the x-rows texture can hold on a device with `limits`: larger batches
/// run in chunks.
pub fn max_x_rows(limits: &wgpu::Limits) -> u64 {
    limits.max_texture_dimension_2d as u64 * usable_layers(limits) as u64
}

/// Layers for a texture array of `needed` layers of `width` × `height` texels. wgpu's GL
/// backend guesses a texture's kind from its size: one layer makes a plain 2D texture and
/// square layers in multiples of 6 a cube map, and a 2D-array view can read neither; a
/// spare layer keeps it a 2D array (at most SPARE_LAYERS more than needed).
pub fn array_layers(needed: usize, width: usize, height: usize) -> usize {
    let mut layers = needed.max(2);
    if width == height && layers.is_multiple_of(6) {
        layers += 1;
    }
    layers
}

/// A texture of `format`, `width` × `height` texels in `layers` layers (`texture_2d` when
/// `array` is false, else a 2D array), uploaded through the queue with `contents` (texel
/// bytes, layer after layer) when given.
pub(crate) fn texture(
    device: &wgpu::Device,
    label: &str,
    format: wgpu::TextureFormat,
    (width, height, layers): (usize, usize, usize),
    array: bool,
    usage: wgpu::TextureUsages,
    contents: Option<(&wgpu::Queue, &[u8])>,
) -> wgpu::TextureView {
    let descriptor = wgpu::TextureDescriptor {
        label: Some(label),
        size: wgpu::Extent3d {
            width: width as u32,
            height: height as u32,
            depth_or_array_layers: layers as u32,
        },
        mip_level_count: 1,
        sample_count: 1,
        dimension: wgpu::TextureDimension::D2,
        format,
        usage,
        view_formats: &[],
    };
    let texture = match contents {
        Some((queue, data)) => device.create_texture_with_data(
            queue,
            &descriptor,
            wgpu::util::TextureDataOrder::LayerMajor,
            data,
        ),
        None => device.create_texture(&descriptor),
    };
    texture.create_view(&wgpu::TextureViewDescriptor {
        label: Some(label),
        dimension: Some(if array {
            wgpu::TextureViewDimension::D2Array
        } else {
            wgpu::TextureViewDimension::D2
        }),
        ..Default::default()
    })
}

/// A texture array of `format` holding `data` (see `texture`), read by the kernels and,
/// when `writable`, also written (a trainable layer's weights after an optimizer step).
pub fn texture_array(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    label: &str,
    format: wgpu::TextureFormat,
    extent: (usize, usize, usize),
    data: &[u8],
    writable: bool,
) -> wgpu::TextureView {
    let usage = wgpu::TextureUsages::TEXTURE_BINDING
        | wgpu::TextureUsages::COPY_DST
        | written_usage(writable);
    texture(
        device,
        label,
        format,
        extent,
        true,
        usage,
        Some((queue, data)),
    )
}

/// STORAGE_BINDING for textures the kernels write, nothing otherwise.
pub(crate) fn written_usage(writable: bool) -> wgpu::TextureUsages {
    if writable {
        wgpu::TextureUsages::STORAGE_BINDING
    } else {
        wgpu::TextureUsages::empty()
    }
}

/// `n` rounded up to a multiple of 4: the row length of matrices the matmuls read as vec4s.
pub fn padded_to_vec4(n: usize) -> usize {
    n.div_ceil(4) * 4
}

/// Rows of `width` floats, each zero-padded to `padded_to_vec4(width)`.
pub(crate) fn pad_rows(data: &[f32], width: usize) -> std::borrow::Cow<'_, [f32]> {
    let padded = padded_to_vec4(width);
    if padded == width {
        return data.into();
    }
    let mut out = Vec::with_capacity(data.len() / width * padded);
    for row in data.chunks(width) {
        out.extend_from_slice(row);
        out.resize(out.len() + padded - width, 0.0);
    }
    out.into()
}

/// A buffer the host maps to read `bytes` copied into it (never empty).
pub fn staging_buffer(device: &wgpu::Device, label: &str, bytes: u64) -> wgpu::Buffer {
    device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: bytes.max(4),
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    })
}
