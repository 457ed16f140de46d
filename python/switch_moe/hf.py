"""switch_moe.hf: the layer's experts as an experts implementation of transformers 5.x.

    import switch_moe.hf
    switch_moe.hf.register()                          # adds "switch_moe" to the registry
    model.config._experts_implementation = "switch_moe"

Every model whose experts use transformers' experts interface (Mixtral, Qwen-MoE and those
built on them) then runs its experts through ``MoeLayer.forward_experts``: the model's own
router picks the experts and weights; the GPU runs them all in one grouped dispatch per
projection. The experts' weights are taken again only when one of them changed.

This implementation has no backward yet: it runs under ``torch.no_grad()`` (as
``generate`` does) and raises ``TrainingError`` when a gradient would be needed.
"""

import numpy as np
import torch

from ._errors import TrainingError
from ._native import MoeLayer

NAME = "switch_moe"


def register(name=NAME):
    """Registers the implementation under ``name`` in transformers' experts registry."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(name, experts_forward)


def _activation(experts):
    from .torch import _activation_name

    return _activation_name(experts.act_fn)


def _native_weights(experts):
    """The experts module's weights under the layer's native names."""

    def array(t):
        return t.detach().to("cpu", torch.float32).numpy()

    transposed = getattr(experts, "is_transposed", False)
    down = experts.down_proj.transpose(1, 2) if transposed else experts.down_proj
    weights = {"experts.w2": array(down)}
    if getattr(experts, "has_gate", True):
        if not getattr(experts, "is_concatenated", True):
            raise ValueError("interleaved gate/up weights are not supported")
        gate_up = experts.gate_up_proj.transpose(1, 2) if transposed else experts.gate_up_proj
        half = gate_up.shape[1] // 2
        weights["experts.w1"] = array(gate_up[:, :half])
        weights["experts.w3"] = array(gate_up[:, half:])
        if getattr(experts, "has_bias", False):
            weights["experts.b1"] = array(experts.gate_up_proj_bias[:, :half])
            weights["experts.b3"] = array(experts.gate_up_proj_bias[:, half:])
    else:
        up = experts.up_proj.transpose(1, 2) if transposed else experts.up_proj
        weights["experts.w1"] = array(up)
        if getattr(experts, "has_bias", False):
            weights["experts.b1"] = array(experts.up_proj_bias)
    if getattr(experts, "has_bias", False):
        weights["experts.b2"] = array(experts.down_proj_bias)
    n, d = weights["experts.w2"].shape[:2]
    # The experts run without the layer's router: a zero one stands in.
    weights["router.weight"] = np.zeros((n, d), np.float32)
    return weights


def _layer(experts):
    """The experts module's GPU layer, its weights refreshed after any change."""
    versions = [(id(p), p._version) for p in experts.parameters()]
    layer, seen = getattr(experts, "_switch_moe_layer", (None, None))
    if layer is None:
        config = {
            "gated": getattr(experts, "has_gate", True),
            "activation": _activation(experts),
            "naming": "native",
        }
        layer = MoeLayer(_native_weights(experts), config)
    elif seen != versions:
        layer.set_weights(_native_weights(experts))
    experts._switch_moe_layer = (layer, versions)
    return layer


def experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """transformers' experts interface: ``hidden_states [T, D]``, ``top_k_index [T, k]``,
    ``top_k_weights [T, k]`` → ``[T, D]``."""
    needs_grad = torch.is_grad_enabled() and (
        hidden_states.requires_grad
        or top_k_weights.requires_grad
        or any(p.requires_grad for p in self.parameters())
    )
    if needs_grad:
        raise TrainingError(
            "the switch_moe experts implementation has no backward yet: run it under "
            "torch.no_grad() (as generate does)"
        )
    layer = _layer(self)
    y = layer.forward_experts(
        hidden_states.detach().to("cpu", torch.float32).numpy(),
        top_k_index.detach().to("cpu").numpy(),
        top_k_weights.detach().to("cpu", torch.float32).numpy(),
    )
    return torch.from_numpy(y).to(device=hidden_states.device, dtype=hidden_states.dtype)
