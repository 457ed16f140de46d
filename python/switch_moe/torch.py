"""switch_moe.torch: the layer as a torch module, differentiable through torch autograd.

    from switch_moe.torch import SwitchFeedForward
    model.ffn = SwitchFeedForward.from_labml(model.ffn)   # a labml_nn SwitchFeedForward

The module's parameters are ordinary ``nn.Parameter``s in the layer's native layout, so any
torch optimizer trains them; the GPU layer takes their values again only when one of them
changed (torch's in-place version counters). Tensors cross to the GPU through host memory,
once each way: wgpu's buffers cannot be shared with CUDA tensors.

Differences from labml_nn's module, by design: assignments over capacity are dropped in
token order (SPEC), not after labml's random shuffle; expert dropout is not applied (a
warning says so when the labml experts have it); ``route_prob_max`` carries no gradient.
"""

import warnings

import numpy as np
import torch
from torch import nn

from ._native import MoeLayer

# Native tensor names, in the order the autograd function takes the parameters.
NATIVE_NAMES = (
    "router.weight",
    "router.bias",
    "experts.w1",
    "experts.b1",
    "experts.w2",
    "experts.b2",
    "experts.w3",
    "experts.b3",
)


def _attribute(name):
    return name.replace(".", "_")


class _MoeFunction(torch.autograd.Function):
    """y and route_prob_sum of the GPU layer, with the GPU backward as their gradient."""

    @staticmethod
    def forward(ctx, module, x, *parameters):
        layer = module._layer_for_current_weights()
        out = layer.forward(x.detach().to("cpu", torch.float32).numpy())
        module._forwards += 1
        ctx.module = module
        ctx.forward_id = module._forwards
        ctx.save_for_backward(x)
        like = dict(device=x.device, dtype=x.dtype)
        y = torch.from_numpy(out["y"]).to(**like)
        route_prob_sum = torch.from_numpy(out["route_prob_sum"]).to(**like)
        counts = torch.from_numpy(out["counts"]).to(**like)
        route_prob_max = torch.from_numpy(out["route_prob_max"]).to(**like)
        ctx.mark_non_differentiable(counts, route_prob_max)
        module._last_statistics = out
        return y, route_prob_sum, counts, route_prob_max

    @staticmethod
    def backward(ctx, dy, d_route_prob_sum, _counts, _route_prob_max):
        module = ctx.module
        (x,) = ctx.saved_tensors
        layer = module._layer
        # The layer keeps only its last forward: a module called again before this
        # backward runs its forward once more (the same result, bit for bit).
        if module._forwards != ctx.forward_id:
            layer.forward(x.detach().to("cpu", torch.float32).numpy())
            module._forwards += 1
            ctx.forward_id = module._forwards
        if dy is None:
            dy = torch.zeros_like(x)
        prob_sum_grad = None
        if d_route_prob_sum is not None:
            prob_sum_grad = d_route_prob_sum.detach().to("cpu", torch.float32).numpy()
        grads = layer.backward(
            dy.detach().to("cpu", torch.float32).numpy(),
            route_prob_sum_grad=prob_sum_grad,
        )
        like = dict(device=x.device, dtype=x.dtype)
        out = [None, torch.from_numpy(grads["x"]).to(**like)]
        for name in module._names:
            out.append(torch.from_numpy(grads[name]).to(**like))
        return tuple(out)


class SwitchFeedForward(nn.Module):
    """A Mixture-of-Experts layer (labml_nn's ``SwitchFeedForward`` interface) on the GPU.

    ``forward(x)`` for ``x [seq, batch, d_model]`` returns labml's tuple
    ``(y, counts, route_prob_sum, n_dropped, route_prob_max)``; ``y`` and
    ``route_prob_sum`` are differentiable.
    """

    def __init__(self, weights, config):
        """``weights``: tensors or arrays under their native names (router.weight [N, D],
        router.bias [N], experts.w1 [N, F, D], experts.b1 [N, F], experts.w2 [N, D, F],
        experts.b2 [N, D], experts.w3 [N, F, D], experts.b3 [N, F]; biases and w3
        optional); ``config``: the config JSON's keys."""
        super().__init__()
        self.config = dict(config)
        self._names = [name for name in NATIVE_NAMES if name in weights]
        for name in self._names:
            value = torch.as_tensor(np.asarray(weights[name], dtype=np.float32))
            setattr(self, _attribute(name), nn.Parameter(value.clone()))
        self._layer = None
        self._versions = None
        self._forwards = 0
        self._last_statistics = None

    def _parameters_in_order(self):
        return [getattr(self, _attribute(name)) for name in self._names]

    def _weights_dict(self):
        return {
            name: p.detach().to("cpu", torch.float32).numpy()
            for name, p in zip(self._names, self._parameters_in_order())
        }

    def _layer_for_current_weights(self):
        versions = [(id(p), p._version) for p in self._parameters_in_order()]
        if self._layer is None:
            self._layer = MoeLayer(self._weights_dict(), {**self.config, "naming": "native"})
        elif versions != self._versions:
            self._layer.set_weights(self._weights_dict())
        self._versions = versions
        return self._layer

    def forward(self, x):
        y, route_prob_sum, counts, route_prob_max = _MoeFunction.apply(
            self, x, *self._parameters_in_order()
        )
        n_dropped = int(self._last_statistics["n_dropped"])
        return y, counts, route_prob_sum, n_dropped, route_prob_max

    @classmethod
    def from_labml(cls, module):
        """The layer of a labml_nn ``SwitchFeedForward`` (its ``FeedForward`` experts,
        gated or not), with parameters initialised from the module's."""
        experts = list(module.experts)
        first = experts[0]
        gated = bool(getattr(first, "is_gated", False))
        dropout = getattr(getattr(first, "dropout", None), "p", 0.0)
        if dropout:
            warnings.warn(
                f"the labml experts have dropout {dropout}: switch_moe does not apply it",
                stacklevel=2,
            )

        def stack(get):
            return torch.stack([get(e).detach() for e in experts]).float().numpy()

        def bias_stack(layer_name):
            layers = [getattr(e, layer_name) for e in experts]
            if any(layer.bias is None for layer in layers):
                return None
            return torch.stack([layer.bias.detach() for layer in layers]).float().numpy()

        weights = {
            "router.weight": module.switch.weight.detach().float().numpy(),
            "experts.w1": stack(lambda e: e.layer1.weight),
            "experts.w2": stack(lambda e: e.layer2.weight),
        }
        optional = {
            "router.bias": (
                None
                if module.switch.bias is None
                else module.switch.bias.detach().float().numpy()
            ),
            "experts.b1": bias_stack("layer1"),
            "experts.b2": bias_stack("layer2"),
        }
        if gated:
            weights["experts.w3"] = stack(lambda e: e.linear_v.weight)
            optional["experts.b3"] = bias_stack("linear_v")
        weights.update({k: v for k, v in optional.items() if v is not None})
        config = {
            "n_experts": module.n_experts,
            "top_k": 1,
            "capacity_factor": float(module.capacity_factor),
            "drop_tokens": bool(module.drop_tokens),
            "drop_policy": "pass_through",
            "scale_by_prob": bool(module.is_scale_prob),
            "activation": _activation_name(first.activation),
            "gated": gated,
            "normalize_top_k": False,
        }
        return cls(weights, config)


def _activation_name(activation):
    if isinstance(activation, nn.ReLU):
        return "relu"
    if isinstance(activation, nn.GELU):
        return "gelu_tanh" if activation.approximate == "tanh" else "gelu"
    if isinstance(activation, nn.SiLU):
        return "silu"
    raise ValueError(f"activation {activation!r}: switch_moe has relu, gelu, gelu_tanh, silu")
