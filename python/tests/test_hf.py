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
