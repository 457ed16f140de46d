"""switch_moe.hf: the layer's experts as an experts implementation of transformers 5.x.

    import switch_moe.hf
    switch_moe.hf.register()                          # adds "switch_moe" to the registry
    model.config._experts_implementation = "switch_moe"

Every model whose experts use transformers' experts interface (Mixtral, Qwen-MoE and those
built on them) then runs its experts through ``MoeLayer.forward_experts``: the model's own
router picks the experts and weights; the GPU runs them all in one grouped dispatch per
projection. The experts' weights are taken again only when one of them changed.

It is differentiable through torch autograd: ``MoeLayer.backward_experts`` gives the
gradients of the hidden states, of the routing weights (so the model's router trains
through them) and of the experts' parameters, in the module's own layout. Tensors cross
through host memory, once each way.
"""

import torch

from ._kept import KeptLayer, host

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
    transposed = getattr(experts, "is_transposed", False)
    down = experts.down_proj.transpose(1, 2) if transposed else experts.down_proj
    weights = {"experts.w2": host(down)}
    if getattr(experts, "has_gate", True):
        if not getattr(experts, "is_concatenated", True):
            raise ValueError("interleaved gate/up weights are not supported")
        gate_up = experts.gate_up_proj.transpose(1, 2) if transposed else experts.gate_up_proj
        half = gate_up.shape[1] // 2
        weights["experts.w1"] = host(gate_up[:, :half])
        weights["experts.w3"] = host(gate_up[:, half:])
        if getattr(experts, "has_bias", False):
            weights["experts.b1"] = host(experts.gate_up_proj_bias[:, :half])
            weights["experts.b3"] = host(experts.gate_up_proj_bias[:, half:])
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
        config = {"gated": getattr(experts, "has_gate", True), "activation": _activation(experts)}
        kept = experts._switch_moe_layer = KeptLayer(config, experts_only=True)
    kept.refreshed(list(experts.parameters()), lambda: _native_weights(experts))
    return kept


def _parameter_gradients(experts, grads):
    """The experts module's parameter gradients (in ``named_parameters`` order, in its own
    layout) from the layer's native ones: the inverse of ``_native_weights``."""

    def tensor(name):
        return torch.from_numpy(grads[name])

    transposed = getattr(experts, "is_transposed", False)

    def laid_out(t):
        return t.transpose(1, 2) if transposed else t

    def joined(first, second):
        return torch.cat([tensor(first), tensor(second)], dim=1)

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
            raise ValueError(f"experts parameter {name!r}: switch_moe has no gradient for it")
        out.append(native[name].to(device=parameter.device, dtype=parameter.dtype))
    return out


class _ExpertsFunction(torch.autograd.Function):
    """The experts on pre-routed tokens, with ``backward_experts`` as their gradient."""

    @staticmethod
    def forward(ctx, experts, kept, hidden_states, top_k_index, top_k_weights, *parameters):
        inputs = (host(hidden_states), top_k_index.detach().cpu().numpy(), host(top_k_weights))
        y, ctx.ticket = kept.forward("forward_experts", *inputs)
        ctx.experts, ctx.kept = experts, kept
        ctx.hidden_like = dict(device=hidden_states.device, dtype=hidden_states.dtype)
        ctx.weights_like = dict(device=top_k_weights.device, dtype=top_k_weights.dtype)
        return torch.from_numpy(y).to(**ctx.hidden_like)

    @staticmethod
    def backward(ctx, dy):
        ctx.kept.before_backward(ctx.ticket)
        grads = ctx.kept.layer.backward_experts(host(dy))
        dx = torch.from_numpy(grads["x"]).to(**ctx.hidden_like)
        d_weights = torch.from_numpy(grads["top_k_weights"]).to(**ctx.weights_like)
        return (None, None, dx, None, d_weights, *_parameter_gradients(ctx.experts, grads))


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
    y = kept.layer.forward_experts(
        host(hidden_states), top_k_index.detach().cpu().numpy(), host(top_k_weights)
    )
    return torch.from_numpy(y).to(device=hidden_states.device, dtype=hidden_states.dtype)
