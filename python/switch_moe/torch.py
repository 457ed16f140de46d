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

import json
import warnings

import numpy as np
import torch
from torch import nn

from ._hidden_unit import activation_name
from ._kept import KeptLayer, host
from ._native import layer_config_from_transformers, native_weights

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
    "shared.w1",
    "shared.b1",
    "shared.w2",
    "shared.b2",
    "shared.w3",
    "shared.b3",
    "shared.gate",
)

# The families' transformers 5.x blocks from_hf takes whole (router, shared expert,
# experts), their layer config derived from their model config as the forward tool does.
FAMILY_BLOCKS = (
    "DeepseekV3MoE",
    "Glm4MoeMoE",
    "Qwen2MoeSparseMoeBlock",
    "Qwen3MoeSparseMoeBlock",
    "OlmoeSparseMoeBlock",
    "GptOssMLP",
    "Ernie4_5_MoeSparseMoeBlock",
    "Llama4TextMoe",
)


def _attribute(name):
    return name.replace(".", "_")


class _MoeFunction(torch.autograd.Function):
    """y and route_prob_sum of the GPU layer, with the GPU backward as their gradient."""

    @staticmethod
    def forward(ctx, module, group_size, x, *parameters):
        kept = module._layer_for(group_size)
        out, ctx.ticket = kept.forward("forward", host(x))
        ctx.module, ctx.kept = module, kept
        ctx.like = dict(device=x.device, dtype=x.dtype)
        y = torch.from_numpy(out["y"]).to(**ctx.like)
        route_prob_sum = torch.from_numpy(out["route_prob_sum"]).to(**ctx.like)
        counts = torch.from_numpy(out["counts"]).to(**ctx.like)
        route_prob_max = torch.from_numpy(out["route_prob_max"]).to(**ctx.like)
        ctx.mark_non_differentiable(counts, route_prob_max)
        module._last_statistics = out
        return y, route_prob_sum, counts, route_prob_max

    @staticmethod
    def backward(ctx, dy, d_route_prob_sum, _counts, _route_prob_max):
        ctx.kept.before_backward(ctx.ticket)
        prob_sum_grad = None if d_route_prob_sum is None else host(d_route_prob_sum)
        grads = ctx.kept.layer.backward(host(dy), route_prob_sum_grad=prob_sum_grad)
        out = [None, None, torch.from_numpy(grads["x"]).to(**ctx.like)]
        for name in ctx.module._names:
            out.append(torch.from_numpy(grads[name]).to(**ctx.like))
        return tuple(out)


class _GpuMoe(nn.Module):
    """The GPU layer with its weights as ``nn.Parameter``s in the native layout; the layers
    (one per capacity group size asked for) take the parameters' values again only when
    one of them changed (see _kept.py)."""

    def __init__(self, weights, config):
        super().__init__()
        self.config = dict(config)
        self._names = [name for name in NATIVE_NAMES if name in weights]
        for name in self._names:
            value = torch.as_tensor(np.asarray(weights[name], dtype=np.float32))
            setattr(self, _attribute(name), nn.Parameter(value.clone()))
        # DeepSeek-V3's selection bias chooses but never weighs: a buffer, not a parameter.
        self._score_bias = "router.score_bias" in weights
        if self._score_bias:
            bias = np.asarray(weights["router.score_bias"], dtype=np.float32)
            self.register_buffer("router_score_bias", torch.as_tensor(bias).clone())
        # KeptLayer per capacity group size.
        self._layers = {}
        self._last_statistics = None

    def _parameters_in_order(self):
        return [getattr(self, _attribute(name)) for name in self._names]

    def _weights_dict(self):
        weights = {name: host(p) for name, p in zip(self._names, self._parameters_in_order())}
        if self._score_bias:
            weights["router.score_bias"] = host(self.router_score_bias)
        return weights

    def _layer_for(self, group_size):
        kept = self._layers.get(group_size)
        if kept is None:
            config = dict(self.config)
            if group_size is not None:
                config["group_size"] = group_size
            kept = self._layers[group_size] = KeptLayer(config)
        kept.refreshed(self._parameters_in_order(), self._weights_dict)
        return kept

    def _run(self, x, group_size=None):
        """y (shape of x), route_prob_sum, counts, route_prob_max, n_dropped."""
        y, route_prob_sum, counts, route_prob_max = _MoeFunction.apply(
            self, group_size, x, *self._parameters_in_order()
        )
        n_dropped = int(self._last_statistics["n_dropped"])
        return y, route_prob_sum, counts, route_prob_max, n_dropped


class SwitchFeedForward(_GpuMoe):
    """A Mixture-of-Experts layer (labml_nn's ``SwitchFeedForward`` interface) on the GPU.

    ``forward(x)`` for ``x [seq, batch, d_model]`` returns labml's tuple
    ``(y, counts, route_prob_sum, n_dropped, route_prob_max)``; ``y`` and
    ``route_prob_sum`` are differentiable. ``weights`` are tensors or arrays under their
    native names (router.weight [N, D], router.bias [N], experts.w1 [N, F, D], experts.b1
    [N, F], experts.w2 [N, D, F], experts.b2 [N, D], experts.w3 [N, F, D], experts.b3
    [N, F]; biases and w3 optional); ``config`` the config JSON's keys.
    """

    def forward(self, x):
        y, route_prob_sum, counts, route_prob_max, n_dropped = self._run(x)
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
        return cls(native_weights(_state_arrays(module), config), config)


class MoeFeedForward(_GpuMoe):
    """Hugging Face's MoE blocks on the GPU: ``forward(hidden_states [batch, seq, d])``
    returns the block's ``hidden_states``, differentiable (x, the router and the experts).
    For ``SwitchTransformersSparseMLP`` the capacity groups are the sequences, as there."""

    def __init__(self, weights, config, group_per_sequence=False):
        super().__init__(weights, config)
        self.group_per_sequence = group_per_sequence

    def forward(self, hidden_states):
        batch, sequence, d_model = hidden_states.shape
        group_size = sequence if self.group_per_sequence else None
        y, *_ = self._run(hidden_states.reshape(batch * sequence, d_model), group_size)
        return y.reshape(batch, sequence, d_model)

    @classmethod
    def from_hf(cls, module):
        """From a transformers ``MixtralSparseMoeBlock`` or ``SwitchTransformersSparseMLP``,
        or a family's block whole (``FAMILY_BLOCKS``: DeepSeek-V3, GLM-4.5, Qwen2/3-MoE,
        OLMoE, gpt-oss, ERNIE 4.5, Llama 4; router, shared expert and experts), from their own
        weights in their own naming, differentiable (Llama 4's gate on the experts' input
        too)."""
        kind = type(module).__name__
        if kind in FAMILY_BLOCKS:
            config = _family_config(module)
            return cls(native_weights(_state_arrays(module), config), config)
        if kind == "MixtralSparseMoeBlock":
            if module.jitter_noise:
                warnings.warn(
                    "the block's router jitter noise (training only) is not applied",
                    stacklevel=2,
                )
            config = {
                "n_experts": module.experts.num_experts,
                "top_k": module.top_k,
                "drop_tokens": False,
                "scale_by_prob": True,
                "activation": _activation_name(module.experts.act_fn),
                "gated": True,
                "normalize_top_k": True,
            }
            return cls(native_weights(_state_arrays(module), config), config)
        if kind == "SwitchTransformersSparseMLP":
            router = module.router
            if router.jitter_noise:
                warnings.warn(
                    "the block's router jitter noise (training only) is not applied",
                    stacklevel=2,
                )
            config = {
                "n_experts": router.num_experts,
                "top_k": 1,
                "expert_capacity": router.expert_capacity,
                "drop_tokens": True,
                "drop_policy": "zero",
                "scale_by_prob": True,
                "activation": _activation_name(module.experts["expert_0"].act),
                "gated": False,
                "normalize_top_k": False,
            }
            weights = native_weights(_state_arrays(module), config)
            return cls(weights, config, group_per_sequence=True)
        raise ValueError(
            f"{kind}: from_hf takes MixtralSparseMoeBlock, SwitchTransformersSparseMLP or "
            f"one of {', '.join(FAMILY_BLOCKS)}"
        )


def _family_config(module):
    """The layer config of a family's block: from the model config it was built with (on
    the block, its experts or its router), derived by the crate; Llama 4's block keeps none,
    so its is read off the block."""
    if type(module).__name__ == "Llama4TextMoe":
        return {
            "n_experts": module.num_experts,
            "top_k": module.top_k,
            "router_score": "sigmoid",
            "gate_on": "input",
            "drop_tokens": False,
            "gated": True,
            "activation": _activation_name(module.experts.act_fn),
        }
    for part in (module, getattr(module, "experts", None), getattr(module, "gate", None)):
        model_config = getattr(part, "config", None)
        if model_config is not None and hasattr(model_config, "to_json_string"):
            return json.loads(layer_config_from_transformers(model_config.to_json_string()))
    raise ValueError(f"{type(module).__name__}: the block keeps no model config to derive from")


def _state_arrays(module):
    """A module's state dict as f32 numpy arrays (the naming the crate detects)."""
    return {k: v.detach().to("cpu", torch.float32).numpy() for k, v in module.state_dict().items()}


def _activation_name(activation):
    """The layer's name for a torch activation (module or function), found by evaluating it."""
    return activation_name(activation, type(activation).__name__)
