// slot_steps: the K loop of the backward's weight-gradient matmuls, which runs over one
// expert's kept slots four at a time (the shader registry prepends it after backward_common
// and grouped_matmul to expert_down_backward and expert_up_backward; the kernel declares
// `slot_token`).

// Four consecutive slots from `first + 4·k4`: which are kept (below `slots_end`), and the
// texels of their tokens' rows in a tokens texture `height` rows tall (slots past the kept
// ones read the first slot's token; their values are masked).
struct SlotStep {
    slots: vec4<u32>,
    kept: vec4<bool>,
    texels: TokenTexels,
}

fn slot_step(first: u32, slots_end: u32, k4: u32, height: u32) -> SlotStep {
    let slots = vec4(first + 4u * k4) + vec4(0u, 1u, 2u, 3u);
    let kept = slots < vec4(slots_end);
    let read = select(vec4(first), slots, kept);
    let tokens = vec4(slot_token[read.x], slot_token[read.y], slot_token[read.z],
        slot_token[read.w]);
    return SlotStep(slots, kept, token_texels(tokens, height));
}
