"""Whole tiny transformers models whose experts run through ``switch_moe.hf.register()``:
the logits and a greedy generation equal those with transformers' eager experts (the model's
own routers, shared experts and attention around them), one model per family; a tiny
Llama 4 with its MoE blocks swapped whole, its logits, generation and fine-tuning
gradients equal eager's."""

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import switch_moe.hf

TINY = dict(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
)
EXPERTS = dict(num_experts_per_tok=2)
FAMILIES = {
    "mixtral": dict(intermediate_size=48, num_local_experts=4),
    "qwen3_moe": dict(
        intermediate_size=48, moe_intermediate_size=24, num_experts=4, mlp_only_layers=[]
    ),
    "qwen2_moe": dict(
        intermediate_size=48,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=32,
        num_experts=4,
        mlp_only_layers=[],
    ),
    "olmoe": dict(intermediate_size=24, num_experts=4),
    # Layer 0 dense, layer 1 MoE with sigmoid group-limited routing and a shared expert.
    "deepseek_v3": dict(
        intermediate_size=48,
        moe_intermediate_size=24,
        n_routed_experts=8,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        n_shared_experts=1,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        num_key_value_heads=4,
    ),
    "glm4_moe": dict(
        intermediate_size=48,
        moe_intermediate_size=24,
        n_routed_experts=8,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        n_shared_experts=1,
    ),
    # swiglu_oai, interleaved gate/up, biases, transposed weights.
    "gpt_oss": dict(
        intermediate_size=24,
        num_local_experts=4,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=16,
    ),
    "granitemoe": dict(intermediate_size=24, num_local_experts=4),
    "phimoe": dict(intermediate_size=24, num_local_experts=4),
}


def equals_eager(config, parts, switch, eager=lambda model: None):
    """Builds the tiny model of `config` (the weights of parameters whose names contain one
    of `parts` redrawn larger than the init's, so that routing and experts shape the
    logits), runs it eagerly (after `eager(model)`), calls `switch(model)` to put switch_moe
    in, runs it again:
    the logits within f32 rounding (D + F terms, relative to the largest logit) and greedy
    generation identical."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if any(part in name for part in parts):
                parameter.normal_(std=0.2)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    generate = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        eager(model)
        eager_logits = model(ids).logits
        eager_tokens = model.generate(ids, **generate)
        switch(model)
        logits = model(ids).logits
        tokens = model.generate(ids, **generate)
    worst = (logits - eager_logits).abs().max().item()
    assert worst <= 2e-5 * eager_logits.abs().max().item(), f"logits differ by {worst}"
    assert torch.equal(tokens, eager_tokens), f"{tokens} vs {eager_tokens}"
    return model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_tiny_model_equals_eager(family):
    switch_moe.hf.register()
    config = AutoConfig.for_model(family, **{**TINY, **EXPERTS, **FAMILIES[family]})

    def implementation(name):
        def use(model):
            model.config._experts_implementation = name

        return use

    parts = ("experts", "gate", "router")
    model = equals_eager(config, parts, implementation("switch_moe"), implementation("eager"))
    assert any(hasattr(m, "_switch_moe_layer") for m in model.modules()), "experts did not run"


class _Llama4Block(torch.nn.Module):
    """MoeFeedForward.from_hf of a Llama4TextMoe, returning what the decoder layer unpacks
    (its output and, unused there, the router's logits)."""

    def __init__(self, block):
        super().__init__()
        from switch_moe.torch import MoeFeedForward

        self.inner = MoeFeedForward.from_hf(block)

    def forward(self, hidden_states):
        shape = hidden_states.shape
        y = self.inner(hidden_states.reshape(1, -1, shape[-1]))
        return y.reshape(-1, shape[-1]), None


def tiny_llama4_config():
    return AutoConfig.for_model(
        "llama4_text",
        **TINY,
        num_experts_per_tok=1,
        intermediate_size=24,
        intermediate_size_mlp=48,
        num_local_experts=4,
        interleave_moe_layer_step=1,
        no_rope_layers=[1, 1],
        attention_chunk_size=64,
    )


LLAMA4_MOE_PARTS = ("experts", "router", "shared_expert")


def switch_llama4_blocks(model):
    """Each Llama4TextMoe of `model` swapped whole for MoeFeedForward.from_hf."""
    layers = model.model.layers
    moe = [layer for layer in layers if type(layer.feed_forward).__name__ == "Llama4TextMoe"]
    assert len(moe) == 2
    for layer in moe:
        layer.feed_forward = _Llama4Block(layer.feed_forward)


def test_a_tiny_llama4_with_its_blocks_on_the_gpu_equals_eager():
    """Llama 4's experts are outside the experts interface (their block gates the experts'
    input): each MoE block swapped whole for MoeFeedForward.from_hf, the tiny model's
    logits and greedy generation equal eager's."""
    equals_eager(tiny_llama4_config(), LLAMA4_MOE_PARTS, switch_llama4_blocks)


def test_a_tiny_llama4_fine_tunes_with_its_blocks_on_the_gpu_as_eager():
    """A language-model loss through the tiny Llama 4 with its MoE blocks on the GPU: the
    loss and the gradient of every parameter outside the blocks (the embedding, attention
    and norms, which the blocks' input gradients reach) equal eager's, within f32 rounding
    (2e-5 of each tensor's largest gradient, as the logits)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama4_config()).float().eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if any(part in name for part in LLAMA4_MOE_PARTS):
                parameter.normal_(std=0.2)
    ours = copy.deepcopy(model)
    switch_llama4_blocks(ours)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(2))
    losses = [m(ids, labels=ids).loss for m in (model, ours)]
    for loss in losses:
        loss.backward()
    assert abs(losses[1].item() - losses[0].item()) <= 1e-5 * losses[0].item()
    theirs = dict(model.named_parameters())
    compared = 0
    for name, parameter in ours.named_parameters():
        if "feed_forward" in name:
            continue
        expected = theirs[name].grad
        worst = (parameter.grad - expected).abs().max().item()
        assert worst <= 2e-5 * expected.abs().max().item() + 1e-7, f"d{name}: {worst}"
        compared += 1
    assert compared >= 10, compared
