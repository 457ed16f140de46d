import os
from typing import Any, Dict, List, Mapping, Optional, Union

import numpy as np
import numpy.typing as npt

class MoeLayer:
    """A Mixture-of-Experts layer on the GPU."""

    def __init__(
        self,
        weights: Union[str, "os.PathLike[str]", Mapping[str, npt.ArrayLike]],
        config: Optional[Dict[str, Any]] = None,
        *,
        prefix: Optional[str] = None,
    ) -> None: ...
    @property
    def num_experts(self) -> int: ...
    @property
    def d_model(self) -> int: ...
    @property
    def d_ff(self) -> int: ...
    @property
    def config(self) -> Dict[str, Any]: ...
    @property
    def weight_formats(self) -> List[str]: ...
    @property
    def trainable(self) -> bool: ...
    def set_weights(self, weights: Mapping[str, npt.ArrayLike]) -> None:
        """Replaces a trainable layer's weights in place (same shapes and tensors)."""
        ...
    def forward(self, x: npt.ArrayLike) -> Dict[str, Any]:
        """y (shape of x), routes [T, k] int64, gates [T, k], route_prob_max [T],
        counts [N] int64, kept [N] int64, route_prob_sum [N], n_dropped (int),
        aux_loss and z_loss (float)."""
        ...
    def forward_experts(
        self,
        x: npt.ArrayLike,
        top_k_index: npt.ArrayLike,
        top_k_weights: npt.ArrayLike,
    ) -> np.ndarray:
        """The experts alone on pre-routed tokens: y[t] = sum_j w[t, j] * E_e[t, j](x[t]);
        no router, no capacity. A trainable layer keeps it for ``backward_experts``."""
        ...
    def backward_experts(self, dy: npt.ArrayLike) -> Dict[str, np.ndarray]:
        """The gradients of sum(dy * y) for the last ``forward_experts``: ``x``,
        ``top_k_weights`` [T, k] and every expert tensor under its native name."""
        ...
    def backward(
        self,
        dy: npt.ArrayLike,
        aux_loss_coef: float = 0.0,
        z_loss_coef: float = 0.0,
        route_prob_sum_grad: Optional[npt.ArrayLike] = None,
    ) -> Dict[str, np.ndarray]:
        """The gradients of sum(dy * y) + aux_loss_coef * aux_loss + z_loss_coef *
        z_loss (+ sum(route_prob_sum_grad * route_prob_sum)) for the last forward: "x"
        and every weight tensor under its native name (router.weight, router.bias,
        experts.w1, experts.b1, experts.w2, experts.b2, experts.w3, experts.b3)."""
        ...

def adapter() -> Dict[str, str]:
    """The GPU adapter: name, backend, device_type, driver."""
    ...

def native_weights(
    weights: Union[str, "os.PathLike[str]", Mapping[str, npt.ArrayLike]],
    config: Optional[Dict[str, Any]] = None,
    *,
    prefix: Optional[str] = None,
) -> Dict[str, np.ndarray]:
    """The weights in the native naming (router.weight [N, D], experts.w1 [N, F, D], ...,
    router.score_bias and shared.* when the layer has them), from any naming the layer
    reads."""
    ...

def layer_config_from_transformers(model_config: str, prefix: Optional[str] = None) -> str:
    """The layer's config JSON text derived from a transformers model config (JSON text
    with model_type) for the layer `prefix` names, with the family's semantics; an
    inexpressible family or a dense layer raises ConfigError."""
    ...
