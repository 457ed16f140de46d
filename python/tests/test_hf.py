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
    from switch_moe import TrainingError

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
    with pytest.raises(TrainingError, match="no backward yet"):
        block(x.requires_grad_(True))
