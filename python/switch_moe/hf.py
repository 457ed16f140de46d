"""switch_moe.hf: the layer's experts as an experts implementation of transformers 5.x.

    import switch_moe.hf
    switch_moe.hf.register()                          # adds "switch_moe" to the registry
    model.config._experts_implementation = "switch_moe"

Every model whose experts use transformers' experts interface (Mixtral, Qwen-MoE and those
built on them) then runs its experts through ``MoeLayer.forward_experts``: the model's own
router picks the experts and weights; the GPU runs them all in one grouped dispatch per
projection. The experts' weights are taken again only when one of them changed.

Any experts class of the interface is recognised by what it computes (see
``_hidden_unit``): its activation, a module or a function (relu, gelu, gelu_tanh, silu,
relu2), its gate (``act(gate)·up``, or gpt-oss's clamped SwiGLU read from the module's
``limit`` and ``alpha``), gate and up concatenated or interleaved, transposed or not, with
biases or not, ungated. Expert ids ≥ the module's ``num_experts`` (what transformers'
expert parallelism sends for tokens routed to another rank) contribute nothing. Anything
else raises ``switch_moe.UnsupportedError`` naming what it met.

It is differentiable through torch autograd: ``MoeLayer.backward_experts`` gives the
gradients of the hidden states, of the routing weights (so the model's router trains
through them) and of the experts' parameters, in the module's own layout. Tensors cross
through host memory, once each way.
"""

import numpy as np
import torch

from ._errors import UnsupportedError
from ._hidden_unit import experts_hidden_unit
from ._kept import KeptLayer, host

NAME = "switch_moe"


def register(name=NAME):
    """Registers the implementation under ``name`` in transformers' experts registry."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(name, experts_forward)


def _split_gate_up(tensor, layout):
    """The gate and up halves of ``tensor`` along dim 1 (its 2F rows)."""
    if layout == "interleaved":
        return tensor[:, 0::2], tensor[:, 1::2]
    half = tensor.shape[1] // 2
    return tensor[:, :half], tensor[:, half:]


def _join_gate_up(gate, up, layout):
    """The inverse of ``_split_gate_up``."""
    if layout == "interleaved":
        return torch.stack([gate, up], dim=2).reshape(gate.shape[0], -1, *gate.shape[2:])
    return torch.cat([gate, up], dim=1)


def _native_weights(experts, layout):
    """The experts module's weights under the layer's native names."""
    transposed = getattr(experts, "is_transposed", False)
    down = experts.down_proj.transpose(1, 2) if transposed else experts.down_proj
    weights = {"experts.w2": host(down)}
    if getattr(experts, "has_gate", True):
        gate_up = experts.gate_up_proj.transpose(1, 2) if transposed else experts.gate_up_proj
        gate, up = _split_gate_up(gate_up, layout)
        weights["experts.w1"], weights["experts.w3"] = host(gate), host(up)
        if getattr(experts, "has_bias", False):
            gate, up = _split_gate_up(experts.gate_up_proj_bias, layout)
            weights["experts.b1"], weights["experts.b3"] = host(gate), host(up)
    else:
        up = experts.up_proj.transpose(1, 2) if transposed else experts.up_proj
        weights["experts.w1"] = host(up)
        if getattr(experts, "has_bias", False):
            weights["experts.b1"] = host(experts.up_proj_bias)
    if getattr(experts, "has_bias", False):
        weights["experts.b2"] = host(experts.down_proj_bias)
    return weights


def _kept(experts):
    """The experts module's GPU layer (its ``KeptLayer``), its weights refreshed after any
    change."""
    kept = getattr(experts, "_switch_moe_layer", None)
    if kept is None:
        config, layout = experts_hidden_unit(experts)
        kept = experts._switch_moe_layer = KeptLayer(config, experts_only=True)
        kept.gate_up_layout = layout
    layout = kept.gate_up_layout
    kept.refreshed(list(experts.parameters()), lambda: _native_weights(experts, layout))
    return kept


def _parameter_gradients(experts, layout, grads):
    """The experts module's parameter gradients (in ``named_parameters`` order, in its own
    layout) from the layer's native ones: the inverse of ``_native_weights``."""

    def tensor(name):
        return torch.from_numpy(grads[name])

    transposed = getattr(experts, "is_transposed", False)

    def laid_out(t):
        return t.transpose(1, 2) if transposed else t

    def joined(first, second):
        return _join_gate_up(tensor(first), tensor(second), layout)

    native = {"down_proj": laid_out(tensor("experts.w2"))}
    if getattr(experts, "has_gate", True):
        native["gate_up_proj"] = laid_out(joined("experts.w1", "experts.w3"))
        if "experts.b1" in grads:
            native["gate_up_proj_bias"] = joined("experts.b1", "experts.b3")
    else:
        native["up_proj"] = laid_out(tensor("experts.w1"))
        if "experts.b1" in grads:
            native["up_proj_bias"] = tensor("experts.b1")
    if "experts.b2" in grads:
        native["down_proj_bias"] = tensor("experts.b2")
    out = []
    for name, parameter in experts.named_parameters():
        if name not in native:
            raise UnsupportedError(
                f"{type(experts).__name__}: parameter {name!r} is none switch_moe has"
            )
        out.append(native[name].to(device=parameter.device, dtype=parameter.dtype))
    return out


class _ExpertsFunction(torch.autograd.Function):
    """The experts on pre-routed tokens, with ``backward_experts`` as their gradient."""

    @staticmethod
    def forward(ctx, experts, kept, hidden_states, top_k_index, top_k_weights, *parameters):
        index, weights, ctx.sentinels = _local_routes(experts, top_k_index, top_k_weights)
        y, ctx.ticket = kept.forward("forward_experts", host(hidden_states), index, weights)
        ctx.experts, ctx.kept = experts, kept
        ctx.hidden_like = dict(device=hidden_states.device, dtype=hidden_states.dtype)
        ctx.weights_like = dict(device=top_k_weights.device, dtype=top_k_weights.dtype)
        return torch.from_numpy(y).to(**ctx.hidden_like)

    @staticmethod
    def backward(ctx, dy):
        ctx.kept.before_backward(ctx.ticket)
        grads = ctx.kept.layer.backward_experts(host(dy))
        dx = torch.from_numpy(grads["x"]).to(**ctx.hidden_like)
        d_weights = torch.from_numpy(grads["top_k_weights"])
        if ctx.sentinels is not None:
            d_weights[torch.from_numpy(ctx.sentinels)] = 0.0
        d_weights = d_weights.to(**ctx.weights_like)
        layout = ctx.kept.gate_up_layout
        return (None, None, dx, None, d_weights, *_parameter_gradients(ctx.experts, layout, grads))


def _local_routes(experts, top_k_index, top_k_weights):
    """The routes as the layer takes them (numpy ``u32`` ids, f32 weights) and the mask of
    ids ≥ the module's ``num_experts`` (None when there are none): those choices, which
    transformers' expert parallelism sends for experts of other ranks, get expert 0 with
    weight 0 and no gradient, as transformers' own implementations treat them."""
    index = top_k_index.detach().cpu().numpy()
    weights = host(top_k_weights)
    num_experts = getattr(experts, "num_experts", None)
    if num_experts is None or index.size == 0 or index.max() < num_experts:
        return index, weights, None
    sentinels = index >= num_experts
    index = np.where(sentinels, 0, index)
    weights = np.where(sentinels, np.float32(0.0), weights)
    return index, weights, sentinels


def experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """transformers' experts interface: ``hidden_states [T, D]``, ``top_k_index [T, k]``,
    ``top_k_weights [T, k]`` → ``[T, D]``, differentiable in the hidden states, the
    weights and the experts' parameters."""
    kept = _kept(self)
    parameters = [p for _, p in self.named_parameters()]
    needs_grad = torch.is_grad_enabled() and (
        hidden_states.requires_grad
        or top_k_weights.requires_grad
        or any(p.requires_grad for p in parameters)
    )
    if needs_grad:
        return _ExpertsFunction.apply(
            self, kept, hidden_states, top_k_index, top_k_weights, *parameters
        )
    index, weights, _ = _local_routes(self, top_k_index, top_k_weights)
    y = kept.layer.forward_experts(host(hidden_states), index, weights)
    return torch.from_numpy(y).to(device=hidden_states.device, dtype=hidden_states.dtype)
