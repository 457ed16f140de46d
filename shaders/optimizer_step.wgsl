// optimizer_step: one AdamW or SGD step on every trainable parameter, in place, element by
// element over one parameter buffer (layout: backward_common.wgsl). AdamW as torch
// computes it (decoupled weight decay):
//   p ← p·(1 − lr·wd);  m ← β1·m + (1 − β1)·g;  v ← β2·v + (1 − β2)·g²;
//   p ← p − (lr / (1 − β1^t))·m / (√v / √(1 − β2^t) + ε)
// SGD: p ← p − lr·(g + wd·p). The bias corrections come from the host for step t.
// CPU twin: cpu_backward_kernels::optimizer_step.
//
// Dispatch: one invocation per 4 parameters (every parameter buffer holds whole vec4s:
// plan::parameter_shards), workgroups of 64 in 2-D; count is in floats.
// Bindings: 0 params, 1 parameters, 2 gradients, 3 first moments m, 4 second moments v
// (AdamW; 16-byte dummies for SGD), all as vec4s.

struct OptimizerParams {
    count: u32,
    // 0 SGD, 1 AdamW.
    kind: u32,
    learning_rate: f32,
    weight_decay: f32,
    beta1: f32,
    beta2: f32,
    epsilon: f32,
    // lr / (1 − β1^t).
    step_size: f32,
    // √(1 − β2^t).
    second_moment_correction: f32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

const WORKGROUP: u32 = 64u;

@group(0) @binding(0) var<uniform> params: OptimizerParams;
@group(0) @binding(1) var<storage, read_write> parameters: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> gradients: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> first_moments: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> second_moments: array<vec4<f32>>;

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) workgroup_id: vec3<u32>,
    @builtin(num_workgroups) num_workgroups: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let index = (workgroup_id.x + workgroup_id.y * num_workgroups.x) * WORKGROUP + lane;
    if (index >= params.count / 4u) {
        return;
    }
    let g = gradients[index];
    var p = parameters[index];
    if (params.kind == 0u) {
        parameters[index] = p - params.learning_rate * (g + params.weight_decay * p);
        return;
    }
    p *= vec4(1.0 - params.learning_rate * params.weight_decay);
    let m = params.beta1 * first_moments[index] + (1.0 - params.beta1) * g;
    let v = params.beta2 * second_moments[index] + (1.0 - params.beta2) * g * g;
    first_moments[index] = m;
    second_moments[index] = v;
    let denominator = sqrt(v) / vec4(params.second_moment_correction) + vec4(params.epsilon);
    parameters[index] = p - params.step_size * m / denominator;
}
