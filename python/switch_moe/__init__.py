"""switch_moe: a Mixture-of-Experts layer (Switch Transformer, top-k MoE) on any GPU through
wgpu (Vulkan, Metal, DX12, GL), forward and backward, with numpy arrays in and out.

    import switch_moe
    layer = switch_moe.MoeLayer("moe.safetensors", {"top_k": 2})
    out = layer.forward(x)              # y, routes, gates, counts, losses, ...
    grads = layer.backward(dy)          # x and every weight, native names

Arrays cross between the host and the GPU once each way (wgpu's buffers cannot be shared
with CUDA tensors); the GIL is released while the GPU works.
"""

from ._errors import (
    ConfigError,
    DeviceError,
    FileError,
    InputError,
    MoeError,
    TensorError,
    TrainingError,
    UnsupportedError,
)
from ._native import MoeLayer, adapter, layer_config_from_transformers, native_weights

__all__ = [
    "MoeLayer",
    "adapter",
    "native_weights",
    "layer_config_from_transformers",
    "MoeError",
    "ConfigError",
    "TensorError",
    "InputError",
    "TrainingError",
    "FileError",
    "DeviceError",
    "UnsupportedError",
]
