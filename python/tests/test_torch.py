"""switch_moe.torch against labml_nn 0.5.1's SwitchFeedForward itself: forward outputs and
torch-autograd gradients of x and every parameter through labml's own load-balancing loss
(f32 bounds), and a two-layer model whose loss falls as the original's does. labml's
random choice of dropped tokens (torch.randperm) is made the identity, which is the
crate's token-order priority."""

from unittest import mock

import numpy as np
import pytest
import torch

from labml_nn.transformers.feed_forward import FeedForward
from labml_nn.transformers.switch import SwitchFeedForward as LabmlSwitch

from switch_moe.torch import SwitchFeedForward

N, D, F = 4, 16, 32


def identity_perm(n, *args, **kwargs):
    return torch.arange(n)


def labml_module(seed, gated=False, capacity_factor=1.0, is_scale_prob=True, shape=(N, D, F)):
    n, d, f = shape
    torch.manual_seed(seed)
    expert = FeedForward(d_model=d, d_ff=f, dropout=0.0, is_gated=gated)
    module = LabmlSwitch(
        capacity_factor=capacity_factor,
        drop_tokens=True,
        is_scale_prob=is_scale_prob,
        n_experts=n,
        expert=expert,
        d_model=d,
    )
    with torch.no_grad():
        # labml deep-copies one expert N times: give each its own parameters.
        torch.nn.init.normal_(module.switch.weight, std=0.6)
        for e in module.experts:
            for p in e.parameters():
                torch.nn.init.normal_(p, std=0.25)
    return module


def aux_loss(counts, route_prob_sum, tokens):
    # labml's load-balancing loss (labml_nn/transformers/switch/experiment.py).
    return counts.shape[0] * ((counts / tokens) * (route_prob_sum / tokens)).sum()


def labml_parameters(module):
    """labml's parameters under the native names, stacked as the layer holds them."""
    experts = list(module.experts)
    out = {
        "router.weight": [module.switch.weight],
        "router.bias": [module.switch.bias],
        "experts.w1": [e.layer1.weight for e in experts],
        "experts.b1": [e.layer1.bias for e in experts],
        "experts.w2": [e.layer2.weight for e in experts],
        "experts.b2": [e.layer2.bias for e in experts],
    }
    if experts[0].is_gated:
        out["experts.w3"] = [e.linear_v.weight for e in experts]
        out["experts.b3"] = [e.linear_v.bias for e in experts]
    return out


def close(name, actual, expected, relative=2e-5):
    actual = actual.detach().double()
    expected = expected.detach().double()
    assert actual.shape == expected.shape, f"{name}: {actual.shape} vs {expected.shape}"
    tolerance = relative * expected.abs().max().item() + 1e-6
    worst = (actual - expected).abs().max().item()
    assert worst <= tolerance, f"{name}: |diff| {worst:.3e} > {tolerance:.3e}"


@pytest.mark.parametrize(
    "gated,is_scale_prob,capacity_factor",
    [(False, True, 1.0), (False, False, 1.0), (True, True, 0.8), (False, True, 4.0)],
)
def test_forward_and_gradients_equal_labml(gated, is_scale_prob, capacity_factor):
    original = labml_module(7, gated, capacity_factor, is_scale_prob)
    swapped = SwitchFeedForward.from_labml(original)
    assert_swap_equals_labml(original, swapped, (8, 6))


def assert_swap_equals_labml(original, swapped, batch, relative=2e-5):
    """One forward and backward of both on the same tokens: outputs, counts, dx and every
    parameter's gradient through labml's own loss (with its load-balancing term)."""
    d = original.switch.weight.shape[1]
    x = torch.randn(*batch, d, generator=torch.Generator().manual_seed(8))
    w = torch.randn(*batch, d, generator=torch.Generator().manual_seed(9))
    tokens = batch[0] * batch[1]

    def run(module):
        xs = x.clone().requires_grad_(True)
        with mock.patch.object(torch, "randperm", identity_perm):
            y, counts, route_prob_sum, n_dropped, route_prob_max = module(xs)
        loss = (y * w).sum() + 0.5 * aux_loss(counts, route_prob_sum, tokens)
        loss.backward()
        return y, counts, route_prob_sum, n_dropped, route_prob_max, xs.grad

    y0, c0, s0, d0, m0, gx0 = run(original)
    y1, c1, s1, d1, m1, gx1 = run(swapped)
    close("y", y1, y0, relative)
    assert torch.equal(c1, c0.to(c1.dtype)), (c1, c0)
    close("route_prob_sum", s1, s0, relative)
    assert d1 == d0
    close("route_prob_max", m1, m0, relative)
    close("dx", gx1, gx0, relative)
    for name, tensors in labml_parameters(original).items():
        expected = torch.stack([t.grad for t in tensors]).reshape(
            getattr(swapped, name.replace(".", "_")).shape
        )
        close(f"d{name}", getattr(swapped, name.replace(".", "_")).grad, expected, relative)


def test_a_64_expert_swap_past_one_binding_trains_with_labmls_gradients():
    # 64 experts of D 256, F 1024: 134.6 MB of parameters, past lavapipe's 128 MiB binding
    # (the layer splits them over weight shards). A gradient's sums run over up to
    # D + F + T = 1792 terms: (D + F + T)·u ≈ 1.1e-4 of the largest value bounds them.
    shape = (64, 256, 1024)
    original = labml_module(41, capacity_factor=1.25, shape=shape)
    swapped = SwitchFeedForward.from_labml(original)
    assert_swap_equals_labml(original, swapped, (16, 32), relative=2e-4)
    # A step of each with the same optimizer moves them alike.
    for module in (original, swapped):
        torch.optim.SGD(module.parameters(), lr=0.05).step()
    x = torch.randn(4, 8, 256, generator=torch.Generator().manual_seed(10))
    with mock.patch.object(torch, "randperm", identity_perm):
        close("y after a step", swapped(x)[0], original(x)[0], 2e-4)


class TwoLayers(torch.nn.Module):
    """A labml-style block: linear in, Switch FFN, linear out."""

    def __init__(self, switch):
        super().__init__()
        torch.manual_seed(11)
        self.inp = torch.nn.Linear(D, D)
        self.switch = switch
        self.out = torch.nn.Linear(D, D)

    def forward(self, x):
        y, counts, route_prob_sum, _, _ = self.switch(self.inp(x))
        tokens = x.shape[0] * x.shape[1]
        return self.out(y), aux_loss(counts, route_prob_sum, tokens)


def train(model, steps=60):
    torch.manual_seed(12)
    x = torch.randn(8, 8, D)
    target = torch.sin(3 * x) + x.roll(1, dims=-1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    with mock.patch.object(torch, "randperm", identity_perm):
        for _ in range(steps):
            optimizer.zero_grad()
            y, aux = model(x)
            loss = torch.nn.functional.mse_loss(y, target) + 0.01 * aux
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return np.array(losses)


def test_a_two_layer_model_trains_like_the_original():
    original = TwoLayers(labml_module(21, capacity_factor=2.0))
    swapped = TwoLayers(SwitchFeedForward.from_labml(labml_module(21, capacity_factor=2.0)))
    labml_losses = train(original)
    our_losses = train(swapped)
    assert our_losses[-1] < 0.5 * our_losses[0], our_losses
    # The same model and data: the two runs track each other (f32 differences only).
    assert abs(our_losses[-1] - labml_losses[-1]) <= 0.05 * labml_losses[-1], (
        our_losses[-1],
        labml_losses[-1],
    )


def test_weights_reupload_only_after_a_parameter_changed():
    swapped = SwitchFeedForward.from_labml(labml_module(31))
    x = torch.randn(4, 2, D)
    y0 = swapped(x)[0]
    layer = swapped._layers[None].layer
    assert torch.equal(swapped(x)[0], y0)
    assert swapped._layers[None].layer is layer
    with torch.no_grad():
        swapped.experts_w2.mul_(2.0)
    y1 = swapped(x)[0]
    assert swapped._layers[None].layer is layer  # the same GPU layer, its weights replaced
    assert not torch.equal(y1, y0)
