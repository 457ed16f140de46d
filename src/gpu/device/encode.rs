//! Recording helpers that know nothing of MoE: one dispatch, a 2-D grid for many
//! workgroups, small writes carried inside a command stream, and the check of a caller's
//! buffer.

use crate::error::{MoeError, Result};

/// One direct dispatch of `pipeline` over a 2-D grid of workgroups.
pub(crate) fn dispatch(
    pass: &mut wgpu::ComputePass<'_>,
    pipeline: &wgpu::ComputePipeline,
    bind_group: &wgpu::BindGroup,
    grid: (u32, u32),
) {
    pass.set_pipeline(pipeline);
    pass.set_bind_group(0, bind_group, &[]);
    pass.dispatch_workgroups(grid.0, grid.1, 1);
}

/// `ceil(a / b)`.
pub fn div_ceil(a: usize, b: usize) -> usize {
    a.div_ceil(b)
}

/// Lays `workgroups` out as (x, y) with x at most `max_per_dimension`; kernels rebuild the
/// linear index as `x + y·num_workgroups.x` and skip the surplus of the last row.
pub fn grid_2d(workgroups: usize, max_per_dimension: u32) -> Result<(u32, u32)> {
    let max = max_per_dimension.max(1) as usize;
    if workgroups == 0 {
        return Ok((0, 1));
    }
    let x = workgroups.min(max);
    let y = div_ceil(workgroups, x);
    if y > max {
        return Err(MoeError::DeviceLimit {
            limit: "max_compute_workgroups_per_dimension (squared)",
            needed: workgroups as u64,
            allowed: (max * max) as u64,
        });
    }
    Ok((x as u32, y as u32))
}

/// A caller's buffer smaller than what an encoded pass needs, as an error.
pub(crate) fn too_small(name: &str, buffer: &wgpu::Buffer, bytes: u64) -> Option<MoeError> {
    (buffer.size() < bytes).then(|| MoeError::InputShape {
        message: format!(
            "buffer `{name}` holds {} bytes, the pass needs {bytes}",
            buffer.size()
        ),
    })
}

/// Records `writes` (target buffer, bytes at its start) into `encoder` as copies from one
/// small staging buffer: an encoded pass's Params travel inside the caller's command stream
/// (a queue write would land at the next submit, whoever makes it).
pub(crate) fn encode_writes(
    device: &wgpu::Device,
    encoder: &mut wgpu::CommandEncoder,
    label: &str,
    writes: &[(&wgpu::Buffer, &[u8])],
) {
    let contents: Vec<u8> = writes
        .iter()
        .flat_map(|(_, bytes)| bytes.iter().copied())
        .collect();
    let staging = wgpu::util::DeviceExt::create_buffer_init(
        device,
        &wgpu::util::BufferInitDescriptor {
            label: Some(label),
            contents: &contents,
            usage: wgpu::BufferUsages::COPY_SRC,
        },
    );
    let mut offset = 0u64;
    for (target, bytes) in writes {
        let size = bytes.len() as u64;
        encoder.copy_buffer_to_buffer(&staging, offset, target, 0, size);
        offset += size;
    }
}
