"""Every experts class of transformers' experts interface (each modeling file's classes
decorated with ``use_experts_implementation``), built tiny: with ``switch_moe.hf.register()``
each either equals transformers' eager experts, output and the gradients of the hidden
states, the routing weights and every parameter, or refuses with switch_moe's
UnsupportedError naming the class, never another exception. The classes expected to be
refused are listed with why; any other class must equal eager."""

import importlib
import inspect
import pathlib
import re

import pytest
import torch
import transformers

import switch_moe
import switch_moe.hf

D, F, N, T, K = 16, 24, 4, 9, 2

# Every size key the families' configs use for an experts module, made tiny.
TINY = dict(
    hidden_size=D,
    intermediate_size=F,
    moe_intermediate_size=F,
    expert_intermediate_size=F,
    ffn_hidden_size=F,
    moe_ffn_hidden_size=F,
    expert_dim=F,
    d_model=D,
    num_local_experts=N,
    n_routed_experts=N,
    num_experts=N,
    moe_num_experts=N,
    num_experts_per_tok=K,
    moe_k=K,
    top_k=K,
)

# What switch_moe cannot express, and why (the error must name the class).
REFUSED = {
    "DeepseekV4Experts": "clamps silu's input and the up half without gpt-oss's +1 and slope",
    "Glm5NextTextExperts": "clamps silu's input and the up half",
    "HYV4Experts": "clamps silu's input and the up half",
    "Inkling2Experts": "a soft-capped SwiGLU",
    "MuseSparkExperts": "a norm after each expert",
}


def experts_classes():
    """(family, module, class name) for every decorated experts class."""
    root = pathlib.Path(transformers.__file__).parent / "models"
    pattern = re.compile(r"@use_experts_implementation(?:\([^)]*\))?\s*\nclass (\w+)")
    found = []
    for path in sorted(root.glob("*/modeling_*.py")):
        for match in pattern.finditer(path.read_text()):
            found.append((path.parent.name, path.stem, match.group(1)))
    return found


CLASSES = experts_classes()


def tiny_experts(family, stem, name):
    """The experts class built from its family's config with tiny sizes, or None when no
    config class of the family builds it."""
    module = importlib.import_module(f"transformers.models.{family}.{stem}")
    cls = getattr(module, name)
    annotation = inspect.signature(inspect.unwrap(cls.__init__)).parameters["config"].annotation
    configs = [annotation] if inspect.isclass(annotation) else []
    try:
        config_module = importlib.import_module(
            f"transformers.models.{family}.configuration_{family}"
        )
        found = [
            c
            for c in vars(config_module).values()
            if inspect.isclass(c)
            and issubclass(c, transformers.PretrainedConfig)
            and c.__module__ == config_module.__name__
        ]
        # Text configs first: composite models' experts live in their text model.
        found.sort(key=lambda c: ("Text" not in c.__name__ and "Thinker" not in c.__name__, c.__name__))
        configs += found
    except ImportError:
        pass
    for config_class in configs:
        try:
            config = config_class()
            for key, value in TINY.items():
                setattr(config, key, value)
            torch.manual_seed(11)
            experts = cls(config)
        except Exception:
            continue
        with torch.no_grad():
            for parameter in experts.parameters():
                parameter.normal_(std=0.3)
        return experts.float()
    return None


def routes(seed):
    g = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(T)])
    weights = torch.rand(T, K, generator=g)
    return index, weights


def run(experts, implementation, x, index, weights, dy):
    """Output and gradients of sum(experts(x, index, weights) * dy)."""
    experts.config._experts_implementation = implementation
    experts.zero_grad()
    x = x.clone().requires_grad_(True)
    weights = weights.clone().requires_grad_(True)
    y = experts(x, index, weights)
    (y * dy).sum().backward()
    grads = {name: p.grad.clone() for name, p in experts.named_parameters()}
    return y.detach(), x.grad, weights.grad, grads


def close(what, actual, expected, relative=2e-5):
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"{what}: {actual.shape} vs {expected.shape}"
    tolerance = relative * expected.abs().max().item() + 1e-6
    worst = (actual - expected).abs().max().item()
    assert worst <= tolerance, f"{what}: |diff| {worst:.3e} > {tolerance:.3e}"


def test_the_sweep_finds_the_interfaces_classes():
    # transformers 5.23 has 65; a sweep that finds few has stopped finding them.
    assert len(CLASSES) >= 60, len(CLASSES)


@pytest.mark.parametrize("family, stem, name", CLASSES, ids=[c[2] for c in CLASSES])
def test_each_experts_class_equals_eager_or_is_refused(family, stem, name):
    switch_moe.hf.register()
    experts = tiny_experts(family, stem, name)
    assert experts is not None, f"{name}: no config class of {family} builds it"
    g = torch.Generator().manual_seed(12)
    d_model = experts.down_proj.shape[1 if not getattr(experts, "is_transposed", False) else 2]
    x = torch.randn(T, d_model, generator=g)
    dy = torch.randn(T, d_model, generator=g)
    index, weights = routes(13)
    eager = run(experts, "eager", x, index, weights, dy)
    if name in REFUSED:
        with pytest.raises(switch_moe.UnsupportedError, match=name):
            run(experts, "switch_moe", x, index, weights, dy)
        return
    ours = run(experts, "switch_moe", x, index, weights, dy)
    assert hasattr(experts, "_switch_moe_layer"), f"{name}: the registered experts did not run"
    close(f"{name}: y", ours[0], eager[0])
    close(f"{name}: dx", ours[1], eager[1])
    close(f"{name}: d top_k_weights", ours[2], eager[2])
    for parameter, expected in eager[3].items():
        close(f"{name}: d{parameter}", ours[3][parameter], expected)


def test_expert_ids_past_the_modules_experts_contribute_nothing():
    """As transformers' expert parallelism sends them: ids ≥ num_experts are other ranks'
    experts; the output and gradients equal those with the choices' weights set to 0."""
    switch_moe.hf.register()
    experts = tiny_experts("mixtral", "modeling_mixtral", "MixtralExperts")
    g = torch.Generator().manual_seed(14)
    x, dy = torch.randn(T, D, generator=g), torch.randn(T, D, generator=g)
    index, weights = routes(15)
    index[::2, 1] = N  # a sentinel in every other token's second choice
    index[3, 0] = N + 5
    local = index.clamp(max=N - 1)
    masked = weights.masked_fill(index >= N, 0.0)
    ours = run(experts, "switch_moe", x, index, weights, dy)
    expected = run(experts, "eager", x, local, masked, dy)
    close("y", ours[0], expected[0])
    close("dx", ours[1], expected[1])
    close("d top_k_weights", ours[2], expected[2].masked_fill(index >= N, 0.0))
    assert (ours[2][index >= N] == 0).all()
    for parameter, grad in expected[3].items():
        close(f"d{parameter}", ours[3][parameter], grad)


def test_activations_as_functions_and_unknown_ones():
    from switch_moe._hidden_unit import activation_name

    functional = torch.nn.functional
    assert activation_name(functional.silu, "m") == "silu"
    assert activation_name(functional.gelu, "m") == "gelu"
    assert activation_name(lambda a: functional.gelu(a, approximate="tanh"), "m") == "gelu_tanh"
    assert activation_name(torch.nn.ReLU(), "m") == "relu"
    assert activation_name(lambda a: torch.relu(a).square(), "m") == "relu2"
    with pytest.raises(switch_moe.UnsupportedError, match="Mish"):
        activation_name(torch.nn.Mish(), "SomeExperts")
    with pytest.raises(switch_moe.UnsupportedError, match="SomeExperts"):
        activation_name(lambda a, b: a * b, "SomeExperts")
