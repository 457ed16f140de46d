"""What a torch experts module computes between its two projections, recognised by what it
does rather than by its class's name: its activation (a module or a plain function) and, for
gated experts, its gate: ``act(gate)·up`` with the gate and up halves concatenated or
interleaved, or gpt-oss's clamped SwiGLU. Each candidate is checked on a probe that spans
well past every clamp, so that a module which only resembles one (a soft cap, a clamp of its
own, a different slope) is refused with an error naming it rather than run wrongly."""

import math

import torch

from ._errors import UnsupportedError

# The layer's activations, as torch computes them.
ACTIVATIONS = {
    "relu": torch.relu,
    "gelu": lambda a: torch.nn.functional.gelu(a),
    "gelu_tanh": lambda a: torch.nn.functional.gelu(a, approximate="tanh"),
    "silu": torch.nn.functional.silu,
    "relu2": lambda a: torch.relu(a) ** 2,
    "quick_gelu": lambda a: a * torch.sigmoid(1.702 * a),
}

# Pre-activations from −60 to 60, dense near 0: past any clamp a checkpoint uses (gpt-oss:
# 7) and where every activation's shape shows.
_PROBE = torch.cat([torch.linspace(-4.0, 4.0, 97), torch.linspace(-60.0, 60.0, 61)])


def _equal(actual, expected):
    """Equal within f32 rounding of the larger values (activations in f32 or f64)."""
    if not isinstance(actual, torch.Tensor) or actual.shape != expected.shape:
        return False
    actual, expected = actual.double(), expected.double()
    if not torch.isfinite(actual).all():
        return False
    return bool(((actual - expected).abs() <= 1e-5 * (expected.abs() + 1.0)).all())


def _describe(thing):
    return getattr(thing, "__qualname__", None) or type(thing).__name__


def activation_name(activation, owner):
    """The layer's name for ``activation`` (a module or a function of one tensor), found by
    evaluating it; ``owner`` names the module it belongs to in the error."""
    try:
        values = activation(_PROBE.clone())
    except Exception as error:
        raise UnsupportedError(
            f"{owner}: its activation {_describe(activation)} cannot be evaluated on one "
            f"tensor ({type(error).__name__}: {error})"
        ) from None
    for name, reference in ACTIVATIONS.items():
        if _equal(values, reference(_PROBE)):
            return name
    raise UnsupportedError(
        f"{owner}: its activation {_describe(activation)} is none of switch_moe's "
        f"({', '.join(ACTIVATIONS)})"
    )


def _swiglu_oai(gate, up, limit, alpha):
    gate = gate.clamp(max=limit)
    return (up.clamp(-limit, limit) + 1.0) * gate * torch.sigmoid(alpha * gate)


def _constant(module, *names):
    """The first of ``names`` the module has as a finite number."""
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, (int, float)) and math.isfinite(value):
            return float(value)
    return None


def experts_hidden_unit(experts):
    """``(config, layout)`` for an experts module of transformers' experts interface:
    the layer's config keys for its hidden units (``gated``, ``activation`` and
    swiglu_oai's ``swiglu_limit`` and ``swiglu_alpha``), and how ``gate_up_proj`` holds the
    gate and up rows (``"concatenated"``, ``"interleaved"``, or None without a gate)."""
    owner = type(experts).__name__
    if getattr(experts, "has_post_expert_norm", False):
        raise UnsupportedError(
            f"{owner}: it normalises each expert's output (has_post_expert_norm), which "
            "switch_moe's experts do not"
        )
    activation = getattr(experts, "act_fn", None)
    if not getattr(experts, "has_gate", True):
        if activation is None:
            raise UnsupportedError(f"{owner}: an ungated experts module without an act_fn")
        return {"gated": False, "activation": activation_name(activation, owner)}, None

    gate_function = getattr(experts, "_apply_gate", None)
    if gate_function is None:
        raise UnsupportedError(f"{owner}: a gated experts module without _apply_gate")
    width = _PROBE.numel()
    # Gate and up values that differ everywhere, so that the layouts tell apart.
    gate_half, up_half = _PROBE, _PROBE.flip(0) * 0.37 + 0.5
    laid_out = {
        "concatenated": torch.cat([gate_half, up_half]).reshape(1, 2 * width),
        "interleaved": torch.stack([gate_half, up_half], dim=1).reshape(1, 2 * width),
    }
    preferred = "concatenated" if getattr(experts, "is_concatenated", True) else "interleaved"
    layouts = [preferred] + [name for name in laid_out if name != preferred]

    candidates = []
    unknown_activation = None
    if activation is not None:
        try:
            name = activation_name(activation, owner)
            candidates.append(({"activation": name}, ACTIVATIONS[name](gate_half) * up_half))
        except UnsupportedError as error:
            # The gate may still be one switch_moe knows; this is the error if it is not.
            unknown_activation = error
    limit = _constant(experts, "limit", "swiglu_limit")
    alpha = _constant(experts, "alpha", "swiglu_alpha")
    if limit is not None and alpha is not None and limit > 0:
        keys = {"activation": "swiglu_oai", "swiglu_limit": limit, "swiglu_alpha": alpha}
        candidates.append((keys, _swiglu_oai(gate_half, up_half, limit, alpha)))

    for layout in layouts:
        try:
            with torch.no_grad():
                values = gate_function(laid_out[layout].clone())
        except Exception as error:
            raise UnsupportedError(
                f"{owner}: its gate {_describe(gate_function)} failed on a probe "
                f"({type(error).__name__}: {error})"
            ) from None
        for keys, expected in candidates:
            if _equal(values, expected.reshape(1, width)):
                return {"gated": True, **keys}, layout
    if unknown_activation is not None:
        raise unknown_activation
    known = "act(gate)·up with " + ", ".join(ACTIVATIONS) + ", or gpt-oss's clamped SwiGLU"
    raise UnsupportedError(
        f"{owner}: its gate {_describe(gate_function)} computes none of switch_moe's hidden "
        f"units ({known}; gate and up concatenated or interleaved)"
    )
