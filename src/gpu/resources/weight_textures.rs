//! Expert weight matrices on the device in their stored format: each matrix stack becomes
//! three u32 texture arrays (quants, high bits, scales), one layer per expert, laid out as
//! `shaders/expert_matmul.wgsl` describes and decodes. The repacking moves bits only:
//! every stored value and scale reaches the GPU unchanged, so the kernels decode exactly
//! what `formats::decode` decodes on the CPU.

use std::ops::Range;

use crate::formats::decode::{q4_k_quant, q4_k_scale_min, q6_k_quant};
use crate::formats::{ExpertMatrices, WeightFormat};
use crate::gpu::device::allocate::{array_layers, padded_to_vec4, texture_array};

/// One plane of a weight tensor: `channels` components of `component_bytes` per texel,
/// `width` texels per row quad, zero-initialised and filled component by component.
struct Plane {
    format: wgpu::TextureFormat,
    channels: usize,
    component_bytes: usize,
    width: usize,
    quads: usize,
    data: Vec<u8>,
}

impl Plane {
    fn new(format: wgpu::TextureFormat, width: usize, quads: usize, experts: usize) -> Self {
        let (channels, component_bytes) = match format {
            wgpu::TextureFormat::Rgba32Uint => (4, 4),
            wgpu::TextureFormat::Rgba16Uint => (4, 2),
            _ => (1, 4),
        };
        let layers = array_layers(experts, width, quads);
        Plane {
            format,
            channels,
            component_bytes,
            width,
            quads,
            data: vec![0; layers * quads * width * channels * component_bytes],
        }
    }

    /// ORs `value` into component `channel` of texel `(x, quad)` of `layer`.
    fn or(&mut self, layer: usize, quad: usize, x: usize, channel: usize, value: u32) {
        let texel = (layer * self.quads + quad) * self.width + x;
        let at = (texel * self.channels + channel) * self.component_bytes;
        let bytes = value.to_le_bytes();
        for (out, byte) in self.data[at..at + self.component_bytes]
            .iter_mut()
            .zip(bytes)
        {
            *out |= byte;
        }
    }

    fn upload(
        &self,
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        label: &str,
        writable: bool,
    ) -> wgpu::TextureView {
        let layers =
            self.data.len() / (self.quads * self.width * self.channels * self.component_bytes);
        let extent = (self.width, self.quads, layers);
        texture_array(
            device,
            queue,
            label,
            self.format,
            extent,
            &self.data,
            writable,
        )
    }
}

/// A weight tensor's three texture arrays (see expert_matmul.wgsl) and their bytes.
#[derive(Debug)]
pub struct WeightTextures {
    pub quants: wgpu::TextureView,
    pub high: wgpu::TextureView,
    pub scales: wgpu::TextureView,
    /// Device bytes of the three, padding included.
    pub bytes: u64,
}

impl WeightTextures {
    /// The three planes as bound to an expert matmul, in binding order (quants, high
    /// bits, scales).
    pub fn bindings(&self) -> [wgpu::BindingResource<'_>; 3] {
        [
            wgpu::BindingResource::TextureView(&self.quants),
            wgpu::BindingResource::TextureView(&self.high),
            wgpu::BindingResource::TextureView(&self.scales),
        ]
    }
}

/// The widest texture row (in texels) a tensor of `format` with rows of `cols` values
/// needs: what must fit the device's `max_texture_dimension_2d`.
pub fn widest_row(format: WeightFormat, cols: usize) -> usize {
    match format {
        WeightFormat::F32 | WeightFormat::F16 | WeightFormat::Bf16 => padded_to_vec4(cols),
        _ => cols / 4,
    }
}

/// A one-texel plane standing in for the high bits or scales a format does not have.
fn dummy() -> Plane {
    Plane::new(wgpu::TextureFormat::R32Uint, 1, 1, 1)
}

/// Packs matrices `experts` of `matrices` and uploads them; `writable`: the quants plane of
/// a trainable layer's f32 tensor, which refresh_expert_weights rewrites.
pub fn upload_weight_textures(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    label: &str,
    matrices: &ExpertMatrices,
    experts: Range<usize>,
    writable: bool,
) -> WeightTextures {
    let (rows, cols, count) = (matrices.rows, matrices.cols, experts.len());
    let quads = padded_to_vec4(rows) / 4;
    use wgpu::TextureFormat::{R32Uint, Rgba16Uint, Rgba32Uint};
    let format = matrices.format;
    let (mut quants, mut high, mut scales) = match format {
        WeightFormat::F32 => (
            Plane::new(Rgba32Uint, padded_to_vec4(cols), quads, count),
            dummy(),
            dummy(),
        ),
        WeightFormat::F16 | WeightFormat::Bf16 => (
            Plane::new(Rgba16Uint, padded_to_vec4(cols), quads, count),
            dummy(),
            dummy(),
        ),
        WeightFormat::Q8_0 => (
            Plane::new(Rgba32Uint, cols / 4, quads, count),
            dummy(),
            Plane::new(Rgba16Uint, cols / 32, quads, count),
        ),
        WeightFormat::Q4_0 => (
            Plane::new(Rgba16Uint, cols / 4, quads, count),
            dummy(),
            Plane::new(Rgba16Uint, cols / 32, quads, count),
        ),
        // Two blocks' exponent bytes per u16: 4.25 bits per weight, as stored.
        WeightFormat::Mxfp4 => (
            Plane::new(Rgba16Uint, cols / 4, quads, count),
            dummy(),
            Plane::new(Rgba16Uint, (cols / 32).div_ceil(2), quads, count),
        ),
        WeightFormat::Q4K => (
            Plane::new(Rgba16Uint, cols / 4, quads, count),
            dummy(),
            Plane::new(Rgba32Uint, 5 * cols / 256, quads, count),
        ),
        WeightFormat::Q6K => (
            Plane::new(Rgba16Uint, cols / 4, quads, count),
            Plane::new(R32Uint, cols / 4, quads, count),
            Plane::new(Rgba32Uint, 5 * cols / 256, quads, count),
        ),
    };
    let block_bytes = format.block_bytes();
    for (layer, expert) in experts.enumerate() {
        for row in 0..rows {
            let (quad, j) = (row / 4, row % 4);
            let stored = matrices.row_stored(expert, row);
            let u16_at = |at: usize| u16::from_le_bytes([stored[at], stored[at + 1]]) as u32;
            match format {
                WeightFormat::F32 | WeightFormat::F16 | WeightFormat::Bf16 => {
                    // Texel (4·k4 + j, quad), component k % 4: the value's bits.
                    for k in 0..cols {
                        let bits = match format {
                            WeightFormat::F32 => u32::from_le_bytes([
                                stored[4 * k],
                                stored[4 * k + 1],
                                stored[4 * k + 2],
                                stored[4 * k + 3],
                            ]),
                            _ => u16_at(2 * k),
                        };
                        quants.or(layer, quad, 4 * (k / 4) + j, k % 4, bits);
                    }
                }
                WeightFormat::Q8_0 | WeightFormat::Q4_0 | WeightFormat::Mxfp4 => {
                    // MXFP4's scale is its exponent byte; the others' f16 bits.
                    let quants_at = if format == WeightFormat::Mxfp4 { 1 } else { 2 };
                    for (block, bytes) in stored.chunks_exact(block_bytes).enumerate() {
                        match format {
                            WeightFormat::Mxfp4 => {
                                let e = (bytes[0] as u32) << (8 * (block % 2));
                                scales.or(layer, quad, block / 2, j, e);
                            }
                            _ => scales.or(layer, quad, block, j, u16_at(block * block_bytes)),
                        }
                        for v in 0..32 {
                            let (k, value) = (
                                32 * block + v,
                                match format {
                                    WeightFormat::Q8_0 => bytes[2 + v] as u32,
                                    _ => (bytes[quants_at + v % 16] as u32 >> (4 * (v / 16))) & 0xf,
                                },
                            );
                            let width = if format == WeightFormat::Q8_0 { 8 } else { 4 };
                            quants.or(layer, quad, k / 4, j, value << (width * (k % 4)));
                        }
                    }
                }
                WeightFormat::Q4K => {
                    for (block, bytes) in stored.chunks_exact(block_bytes).enumerate() {
                        let at = 5 * block;
                        scales.or(
                            layer,
                            quad,
                            at,
                            j,
                            u16_at(144 * block) | (u16_at(144 * block + 2) << 16),
                        );
                        for sub in 0..8 {
                            let (sc, m) = q4_k_scale_min(sub, &bytes[4..16]);
                            let pair = (sc as u32 | ((m as u32) << 8)) << (16 * (sub % 2));
                            scales.or(layer, quad, at + 1 + sub / 2, j, pair);
                        }
                        for v in 0..256 {
                            let k = 256 * block + v;
                            let nibble = q4_k_quant(&bytes[16..144], v) as u32;
                            quants.or(layer, quad, k / 4, j, nibble << (4 * (k % 4)));
                        }
                    }
                }
                WeightFormat::Q6K => {
                    for (block, bytes) in stored.chunks_exact(block_bytes).enumerate() {
                        let at = 5 * block;
                        scales.or(layer, quad, at, j, u16_at(210 * block + 208));
                        for group in 0..16 {
                            let scale = (bytes[192 + group] as u32) << (8 * (group % 4));
                            scales.or(layer, quad, at + 1 + group / 4, j, scale);
                        }
                        for v in 0..256 {
                            let k = 256 * block + v;
                            let q = q6_k_quant(&bytes[0..128], &bytes[128..192], v) as u32;
                            quants.or(layer, quad, k / 4, j, (q & 0xf) << (4 * (k % 4)));
                            high.or(layer, quad, k / 4, 0, (q >> 4) << (8 * j + 2 * (k % 4)));
                        }
                    }
                }
            }
        }
    }
    let bytes = [&quants, &high, &scales]
        .iter()
        .map(|p| p.data.len() as u64)
        .sum();
    WeightTextures {
        quants: quants.upload(device, queue, &format!("{label} quants"), writable),
        high: high.upload(device, queue, &format!("{label} high bits"), false),
        scales: scales.upload(device, queue, &format!("{label} scales"), false),
        bytes,
    }
}
