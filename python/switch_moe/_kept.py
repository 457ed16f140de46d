"""A GPU layer built from torch parameters, shared by the torch front ends: its weights are
taken again only after one of the parameters changed (torch's in-place version counters),
and its forwards are counted, because a layer keeps only its last training forward for the
backward: a backward whose forward is no longer the last runs it once more first (the
same bits)."""

import numpy as np
import torch

from ._native import MoeLayer


def host(tensor):
    """A tensor's values as a float32 numpy array on the host."""
    return tensor.detach().to("cpu", torch.float32).numpy()


class KeptLayer:
    """``refreshed(parameters, weights)`` gives the layer; ``forward(method, *inputs)`` runs
    one of its training forwards and returns a ticket; ``before_backward(ticket)`` makes
    that forward the layer's last again. ``experts_only``: the layer runs its experts on
    the caller's routing alone, so a zero router stands in for the one it has not."""

    def __init__(self, config, *, experts_only=False):
        self.config = {**config, "naming": "native"}
        self.experts_only = experts_only
        self.layer = None
        self.forwards = 0
        self._versions = None

    def refreshed(self, parameters, weights):
        """The layer, its weights taken from ``weights()`` (native names, numpy arrays)
        when it is new or one of ``parameters`` changed since."""
        versions = [(id(p), p._version) for p in parameters]
        if self.layer is not None and versions == self._versions:
            return self.layer
        native = weights()
        if self.experts_only:
            n, d = native["experts.w2"].shape[:2]
            native["router.weight"] = np.zeros((n, d), np.float32)
        if self.layer is None:
            self.layer = MoeLayer(native, self.config)
        else:
            self.layer.set_weights(native)
        self._versions = versions
        return self.layer

    def forward(self, method, *inputs):
        """``layer.<method>(*inputs)`` and the ticket of this forward."""
        result = getattr(self.layer, method)(*inputs)
        self.forwards += 1
        return result, (method, inputs, self.forwards)

    def before_backward(self, ticket):
        """Makes the ticket's forward the layer's last, running it again if another came
        since."""
        method, inputs, number = ticket
        if number != self.forwards:
            getattr(self.layer, method)(*inputs)
            self.forwards += 1
