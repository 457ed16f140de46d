"""switch_moe.torch.MoeFeedForward.from_hf against transformers' own MoE blocks (Mixtral's
and Switch Transformers'): the block's output and torch-autograd gradients of the input and
every parameter (f32 bounds), several sequences, Switch's per-sequence capacity dropping."""

import numpy as np
import pytest
import torch
from transformers import MixtralConfig, SwitchTransformersConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.switch_transformers.modeling_switch_transformers import (
    SwitchTransformersSparseMLP,
)

from switch_moe import native_weights
from switch_moe.torch import NATIVE_NAMES, MoeFeedForward

D, F, N = 16, 32, 4


def mixtral_block():
    torch.manual_seed(5)
    config = MixtralConfig(
        hidden_size=D, intermediate_size=F, num_local_experts=N, num_experts_per_tok=2
    )
    block = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        for p in block.parameters():
            torch.nn.init.normal_(p, std=0.3)
    return block.eval()


def switch_block(capacity):
    torch.manual_seed(6)
    config = SwitchTransformersConfig(
        d_model=D,
        d_ff=F,
        num_experts=N,
        expert_capacity=capacity,
        dropout_rate=0.0,
        router_jitter_noise=0.0,
    )
    block = SwitchTransformersSparseMLP(config)
    with torch.no_grad():
        for p in block.parameters():
            torch.nn.init.normal_(p, std=0.3)
    return block.eval()


def close(name, actual, expected, relative=2e-5):
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"{name}: {actual.shape} vs {expected.shape}"
    tolerance = relative * expected.abs().max().item() + 1e-6
    worst = (actual - expected).abs().max().item()
    assert worst <= tolerance, f"{name}: |diff| {worst:.3e} > {tolerance:.3e}"


@pytest.mark.parametrize(
    "make", [mixtral_block, lambda: switch_block(4), lambda: switch_block(64)],
    ids=["mixtral", "switch-dropping", "switch"],
)
def test_output_and_gradients_equal_the_hf_block(make):
    block = make()
    ours = MoeFeedForward.from_hf(block)
    x = torch.randn(3, 7, D, generator=torch.Generator().manual_seed(7))
    w = torch.randn(3, 7, D, generator=torch.Generator().manual_seed(8))

    def run(module):
        xs = x.clone().requires_grad_(True)
        y = module(xs)
        (y * w).sum().backward()
        return y, xs.grad

    y0, gx0 = run(block)
    y1, gx1 = run(ours)
    close("y", y1, y0)
    close("dx", gx1, gx0)
    # The block's parameter gradients in the native layout (the same conversion as the
    # weights: it is a re-layout).
    hf_grads = {
        name: p.grad.detach().float().numpy() for name, p in block.named_parameters()
    }
    expected = native_weights(hf_grads, ours.config)
    for name in NATIVE_NAMES:
        if name in expected:
            ours_grad = getattr(ours, name.replace(".", "_")).grad
            close(f"d{name}", ours_grad, torch.from_numpy(np.asarray(expected[name])))


def test_other_modules_are_refused():
    with pytest.raises(ValueError, match="from_hf takes"):
        MoeFeedForward.from_hf(torch.nn.Linear(2, 2))


def test_register_runs_a_mixtral_blocks_experts():
    import switch_moe.hf

    switch_moe.hf.register()
    block = mixtral_block()
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        eager = block(x)
        block.experts.config._experts_implementation = "switch_moe"
        ours = block(x)
        assert hasattr(block.experts, "_switch_moe_layer"), "the registered experts did not run"
        close("registered experts", ours, eager)
        # After the weights change, the layer takes them again.
        block.experts.down_proj.mul_(0.5)
        block.experts.config._experts_implementation = None
        eager_half = block(x)
        block.experts.config._experts_implementation = "switch_moe"
        close("after a weight change", block(x), eager_half)


def block_gradients(block, implementation, inputs):
    """Output and torch-autograd gradients of every input and parameter of the block with
    the experts implementation given, for sum_i sum(block(x_i) * w_i) over the inputs (the
    block called once per input before one backward)."""
    block.experts.config._experts_implementation = implementation
    block.zero_grad()
    xs = [x.clone().requires_grad_(True) for x, _ in inputs]
    def forwards():
        kept = getattr(block.experts, "_switch_moe_layer", None)
        return kept.forwards if kept else 0

    before = forwards()
    ys = [block(x) for x in xs]
    sum((y * w).sum() for y, (_, w) in zip(ys, inputs)).backward()
    # Ours ran every forward through the autograd function, plus the re-run of the first.
    ran = forwards() - before
    assert ran == (len(inputs) + 1 if implementation else 0), ran
    grads = {name: p.grad.clone() for name, p in block.named_parameters()}
    return ys, [x.grad for x in xs], grads


def test_registered_experts_train_through_autograd_like_the_eager_ones():
    import switch_moe.hf

    switch_moe.hf.register()
    block = mixtral_block()
    generator = torch.Generator().manual_seed(10)
    # Two calls before one backward: the layer keeps one forward, the first is run again.
    inputs = [(torch.randn(2, 5, D, generator=generator), torch.randn(2, 5, D, generator=generator))
              for _ in range(2)]
    eager = block_gradients(block, None, inputs)
    ours = block_gradients(block, "switch_moe", inputs)
    for i in range(2):
        close(f"y[{i}]", ours[0][i], eager[0][i])
        close(f"dx[{i}]", ours[1][i], eager[1][i])
    assert set(ours[2]) == set(eager[2])
    # The router's gradient flows through the routing weights; the experts' arrive in
    # the module's own layout.
    for name in eager[2]:
        close(f"d{name}", ours[2][name], eager[2][name])


def test_an_optimizer_step_on_registered_experts_matches_eager():
    import switch_moe.hf

    switch_moe.hf.register()
    x = torch.randn(3, 4, D, generator=torch.Generator().manual_seed(11))
    target = torch.randn(3, 4, D, generator=torch.Generator().manual_seed(12))
    losses = {}
    for implementation in (None, "switch_moe"):
        block = mixtral_block()
        block.experts.config._experts_implementation = implementation
        optimizer = torch.optim.SGD(block.parameters(), lr=0.05)
        history = []
        for _ in range(5):
            optimizer.zero_grad()
            loss = ((block(x) - target) ** 2).mean()
            loss.backward()
            optimizer.step()
            history.append(loss.item())
        losses[implementation] = history
        if implementation:
            ran = block.experts._switch_moe_layer.forwards
            assert ran == 5, "the registered experts did not run"
    assert losses["switch_moe"][-1] < losses["switch_moe"][0]
    np.testing.assert_allclose(losses["switch_moe"], losses[None], rtol=1e-4)


def family_block(model_type, module_name, block_name, **sizes):
    """A tiny seeded transformers 5.x MoE block of a family, its parameters and buffers
    redrawn far from ties (the score-correction bias as uniform ±0.1)."""
    import importlib

    from transformers import AutoConfig

    modeling = importlib.import_module(f"transformers.models.{module_name}")
    config = AutoConfig.for_model(model_type, hidden_size=D, **sizes)
    torch.manual_seed(11)
    block = getattr(modeling, block_name)(config)
    g = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for key, t in list(block.named_parameters()) + list(block.named_buffers()):
            if "correction_bias" in key:
                t.copy_(torch.rand(t.shape, generator=g) * 0.2 - 0.1)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)
    return block.eval()


FAMILIES = {
    "deepseek_v3": lambda: family_block(
        "deepseek_v3", "deepseek_v3.modeling_deepseek_v3", "DeepseekV3MoE",
        moe_intermediate_size=12, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
        topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5,
    ),
    "glm4_moe": lambda: family_block(
        "glm4_moe", "glm4_moe.modeling_glm4_moe", "Glm4MoeMoE", moe_intermediate_size=12,
        n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
    ),
    "qwen2_moe": lambda: family_block(
        "qwen2_moe", "qwen2_moe.modeling_qwen2_moe", "Qwen2MoeSparseMoeBlock",
        moe_intermediate_size=12, shared_expert_intermediate_size=20, num_experts=6,
        num_experts_per_tok=2,
    ),
    "qwen3_moe": lambda: family_block(
        "qwen3_moe", "qwen3_moe.modeling_qwen3_moe", "Qwen3MoeSparseMoeBlock",
        moe_intermediate_size=12, num_experts=6, num_experts_per_tok=2, norm_topk_prob=True,
    ),
    "olmoe": lambda: family_block(
        "olmoe", "olmoe.modeling_olmoe", "OlmoeSparseMoeBlock", intermediate_size=12,
        num_experts=6, num_experts_per_tok=2,
    ),
    "gpt_oss": lambda: family_block(
        "gpt_oss", "gpt_oss.modeling_gpt_oss", "GptOssMLP", intermediate_size=12,
        num_local_experts=6, num_experts_per_tok=2,
    ),
    "ernie4_5_moe": lambda: family_block(
        "ernie4_5_moe", "ernie4_5_moe.modeling_ernie4_5_moe", "Ernie4_5_MoeSparseMoeBlock",
        moe_intermediate_size=12, moe_num_experts=6, moe_k=2, moe_num_shared_experts=1,
        use_bias=False,
    ),
    "llama4_text": lambda: family_block(
        "llama4_text", "llama4.modeling_llama4", "Llama4TextMoe", intermediate_size=12,
        num_local_experts=4, num_experts_per_tok=2,
    ),
}


def block_output(block, x):
    out = block(x)
    y = out[0] if isinstance(out, tuple) else out
    return y.reshape(x.shape)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_familys_whole_block_equals_the_hf_block(family):
    """from_hf takes the block whole (router, shared expert, experts): its output and the
    gradients of x and every parameter equal the eager block's (Llama 4's gate on the
    experts' input too)."""
    block = FAMILIES[family]()
    ours = MoeFeedForward.from_hf(block)
    x = torch.randn(2, 9, D, generator=torch.Generator().manual_seed(13))
    w = torch.randn(2, 9, D, generator=torch.Generator().manual_seed(14))
    xs0 = x.clone().requires_grad_(True)
    y0 = block_output(block, xs0)
    (y0 * w).sum().backward()
    xs1 = x.clone().requires_grad_(True)
    y1 = ours(xs1)
    close("y", y1, y0)
    (y1 * w).sum().backward()
    close("dx", xs1.grad, xs0.grad)
    # ERNIE keeps its score bias as a parameter outside the graph: no gradient.
    hf_grads = {
        name: p.grad.detach().float().numpy()
        for name, p in block.named_parameters()
        if p.grad is not None
    }
    expected = native_weights(hf_grads, ours.config)
    compared = 0
    for name in NATIVE_NAMES:
        if name in expected:
            ours_grad = getattr(ours, name.replace(".", "_")).grad
            close(f"d{name}", ours_grad, torch.from_numpy(np.asarray(expected[name])))
            compared += 1
    assert compared >= 4, f"{family}: only {compared} gradients compared"
