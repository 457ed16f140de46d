"""switch_moe.distributed: expert parallelism on torch.distributed.

    import torch.distributed as dist
    from switch_moe.distributed import ExpertParallelMoE

    dist.init_process_group("gloo")          # or "nccl"; torchrun sets the rendezvous
    moe = ExpertParallelMoE("moe.safetensors", {"top_k": 2})
    out = moe(x_local)                       # dict: y, routes, gates, counts, aux_loss, ...
    out["y"].sum().backward()                # every rank calls backward (collectives)

Every rank of the process group holds the router and its own slice of the experts, never
the others'. A forward routes the rank's tokens (the router runs in torch on every rank, as
Megatron's and DeepSpeed's dispatchers do), drops over capacity within the rank's own batch
(capacity groups are the rank's batch, as if it ran alone), sends each kept assignment's
token row to the rank owning its expert in one ``all_to_all_single`` (dropped assignments
never travel), runs the experts on what arrived through ``MoeLayer.forward_experts`` on the
GPU, sends the outputs back in the reverse all-to-all and combines them in each token's
choice order. The result equals ``MoeLayer.forward(x_local)`` of a single layer holding all
experts, within f32 bounds, and is the same bits run after run.

Gradients flow through both all-to-alls (torch autograd): the parameters get the gradient
of the sum of every rank's loss — the local experts from every rank's tokens, the router
all-reduced (summed) in its backward so that every rank holds the same. Hence every rank
must run the backward of every forward, as with any collective.

Not done: capacity across ranks (each rank's batch is its own capacity group), overlap of
communication with the experts' compute, stored formats (the experts train, so f32).
"""

from contextlib import contextmanager
import time

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ._kept import KeptLayer, host
from ._native import native_weights

EXPERT_NAMES = ("experts.w1", "experts.b1", "experts.w2", "experts.b2", "experts.w3", "experts.b3")
ROUTER_NAMES = ("router.weight", "router.bias")


def even_expert_ranges(num_experts, world_size):
    """``[r·N/W, (r+1)·N/W)`` for every rank; N must be divisible by W."""
    if num_experts % world_size:
        raise ValueError(
            f"{num_experts} experts do not divide among {world_size} ranks: pass expert_ranges"
        )
    per_rank = num_experts // world_size
    return [(r * per_rank, (r + 1) * per_rank) for r in range(world_size)]


def _check_ranges(ranges, num_experts, world_size):
    ranges = [(int(a), int(b)) for a, b in ranges]
    if len(ranges) != world_size:
        raise ValueError(f"expert_ranges: {len(ranges)} ranges for {world_size} ranks")
    start = 0
    for rank, (a, b) in enumerate(ranges):
        if a != start or b <= a:
            raise ValueError(
                f"expert_ranges: rank {rank} has [{a}, {b}); the ranges must tile "
                f"[0, {num_experts}) in rank order, each holding at least one expert"
            )
        start = b
    if start != num_experts:
        raise ValueError(f"expert_ranges: they end at {start}, the layer has {num_experts}")
    return ranges


def _native_tensors(weights, config, prefix):
    """The layer's tensors under native names, each as something that slices: a numpy
    array, or a safetensors slice read only where it is indexed. A native-named safetensors
    file is read by slices, so a rank never reads the others' experts; another naming, or
    a dict in one, is converted once by the crate."""
    if not isinstance(weights, dict):
        from safetensors import safe_open

        file = safe_open(str(weights), framework="numpy")
        stored = set(file.keys())
        p = prefix or ""
        names = [name for name in ROUTER_NAMES + EXPERT_NAMES if p + name in stored]
        if {"router.weight", "experts.w1"} <= set(names):
            return {name: file.get_slice(p + name) for name in names}
        weights = str(weights)
    elif set(weights) <= set(ROUTER_NAMES + EXPERT_NAMES) and not prefix:
        return {name: np.asarray(values) for name, values in weights.items()}
    return dict(native_weights(weights, config, prefix=prefix))


class _Exchange(torch.autograd.Function):
    """``all_to_all_single`` of rows with split sizes; its backward is the reverse exchange
    of the gradients."""

    @staticmethod
    def forward(ctx, group, rows, send_sizes, recv_sizes):
        ctx.group, ctx.send_sizes, ctx.recv_sizes = group, send_sizes, recv_sizes
        received = rows.new_empty((sum(recv_sizes), rows.shape[1]))
        dist.all_to_all_single(received, rows.contiguous(), recv_sizes, send_sizes, group=group)
        return received

    @staticmethod
    def backward(ctx, grad):
        returned = grad.new_empty((sum(ctx.send_sizes), grad.shape[1]))
        dist.all_to_all_single(
            returned, grad.contiguous(), ctx.send_sizes, ctx.recv_sizes, group=ctx.group
        )
        return None, returned, None, None


class _SumGradient(torch.autograd.Function):
    """The identity, whose backward sums the gradient over the group (all-reduce)."""

    @staticmethod
    def forward(ctx, group, tensor):
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return None, grad


class _LocalExperts(torch.autograd.Function):
    """The rank's experts on the rows that arrived (``E_{expert[i]}(rows[i])``, weight 1),
    on the GPU, with ``backward_experts`` as their gradient."""

    @staticmethod
    def forward(ctx, module, rows, local_expert, *parameters):
        ctx.module = module
        ctx.like = dict(device=rows.device, dtype=rows.dtype)
        ctx.count = rows.shape[0]
        if ctx.count == 0:
            return rows.new_zeros(rows.shape)
        kept = module._experts_layer()
        inputs = (
            host(rows),
            local_expert.detach().cpu().numpy().reshape(-1, 1),
            np.ones((ctx.count, 1), np.float32),
        )
        y, ctx.ticket = kept.forward("forward_experts", *inputs)
        ctx.kept = kept
        return torch.from_numpy(y).to(**ctx.like)

    @staticmethod
    def backward(ctx, d_out):
        module = ctx.module
        if ctx.count == 0:
            zeros = [torch.zeros_like(p) for p in module._expert_parameters()]
            return (None, torch.zeros(d_out.shape, **ctx.like), None, *zeros)
        ctx.kept.before_backward(ctx.ticket)
        grads = ctx.kept.layer.backward_experts(host(d_out))
        d_rows = torch.from_numpy(grads["x"]).to(**ctx.like)
        d_parameters = [
            torch.from_numpy(grads[name]).to(device=p.device, dtype=p.dtype)
            for name, p in zip(module._expert_names, module._expert_parameters())
        ]
        return (None, d_rows, None, *d_parameters)


@contextmanager
def _timed(times, name):
    if times is None:
        yield
        return
    start = time.perf_counter()
    yield
    times[name] = times.get(name, 0.0) + time.perf_counter() - start


class ExpertParallelMoE(nn.Module):
    """A Mixture-of-Experts layer whose experts are spread over the ranks of a
    torch.distributed process group (see the module's docstring).

    ``weights``: a safetensors path or a dict of arrays (any naming the crate reads;
    native-named files are read by slices); ``config``: the config JSON's keys;
    ``group``: the process group (default: the world); ``expert_ranges``: each rank's
    ``(first, end)`` experts, in rank order (default: N/W each). Parameters:
    ``router_weight`` [N, D] (``router_bias`` [N]) on every rank, ``experts_w1``
    [n_local, F, D], ``experts_w2`` [n_local, D, F], ... for the rank's own experts.
    """

    def __init__(self, weights, config=None, *, group=None, prefix=None, expert_ranges=None):
        super().__init__()
        if not dist.is_initialized():
            raise RuntimeError("ExpertParallelMoE needs torch.distributed.init_process_group")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        user_config = dict(config or {})
        tensors = _native_tensors(weights, user_config, prefix)

        def parameter(name, rows=slice(None)):
            # A copy: never a view of the caller's arrays.
            return nn.Parameter(torch.tensor(np.asarray(tensors[name][rows], np.float32)))

        self.router_weight = parameter("router.weight")
        self.router_bias = parameter("router.bias") if "router.bias" in tensors else None
        self.num_experts = self.router_weight.shape[0]
        ranges = expert_ranges or even_expert_ranges(self.num_experts, self.world_size)
        self.expert_ranges = _check_ranges(ranges, self.num_experts, self.world_size)
        lo, hi = self.expert_ranges[self.rank]
        self._expert_names = [name for name in EXPERT_NAMES if name in tensors]
        for name in self._expert_names:
            setattr(self, name.replace(".", "_"), parameter(name, slice(lo, hi)))
        # owner[e]: the rank holding expert e; first[e]: its index there.
        owner = np.zeros(self.num_experts, np.int64)
        first = np.zeros(self.num_experts, np.int64)
        for rank, (a, b) in enumerate(self.expert_ranges):
            owner[a:b] = rank
            first[a:b] = a
        self._owner = torch.from_numpy(owner)
        self._first = torch.from_numpy(first)
        # The local layer parses and checks the config (the crate's keys and defaults);
        # the routing keys apply to all N experts here.
        local_config = {k: v for k, v in user_config.items() if k not in ("n_experts", "top_k")}
        self._kept = KeptLayer(local_config, experts_only=True)
        self.config = {**self._experts_layer().layer.config, "n_experts": self.num_experts}
        self.config["top_k"] = int(user_config.get("top_k", 1))
        if not 1 <= self.config["top_k"] <= self.num_experts:
            raise ValueError(f"top_k {self.config['top_k']}: expected 1..{self.num_experts}")
        self._last = None
        #: Seconds of the last forward's parts (``profile=True``): route, exchange,
        #: experts, combine.
        self.last_times = None
        #: The last forward's traffic: ``sent``, the bytes of rows this rank sent to other
        #: ranks in both all-to-alls (as many arrive); ``tokens``, the rank's tokens.
        self.last_bytes = None

    def _expert_parameters(self):
        return [getattr(self, name.replace(".", "_")) for name in self._expert_names]

    def _experts_layer(self):
        """The rank's experts' ``KeptLayer``, their values taken again after a change."""
        names, parameters = self._expert_names, self._expert_parameters()
        self._kept.refreshed(parameters, lambda: dict(zip(names, map(host, parameters))))
        return self._kept

    def _route(self, x):
        """Routing of the rank's tokens as the layer computes it (SPEC): probabilities,
        top-k (ties to the lower expert), gates, capacity in priority order."""
        c = self.config
        k, n = int(c["top_k"]), self.num_experts
        router_weight = _SumGradient.apply(self.group, self.router_weight)
        logits = x @ router_weight.t()
        if self.router_bias is not None:
            logits = logits + _SumGradient.apply(self.group, self.router_bias)
        probs = torch.softmax(logits, dim=-1)
        lse = torch.logsumexp(logits, dim=-1)
        order = torch.sort(probs.detach(), dim=-1, descending=True, stable=True).indices
        routes = order[:, :k]
        q = probs.gather(1, routes)
        gates = q / q.sum(dim=1, keepdim=True) if c.get("normalize_top_k") else q
        tokens = x.shape[0]
        group = int(c.get("group_size") or tokens)
        if tokens % group:
            raise ValueError(f"group_size {group} does not divide the {tokens} tokens")
        capacity = None
        if c.get("drop_tokens", True):
            capacity = c.get("expert_capacity")
            if capacity is None:
                capacity = int(np.floor(float(c.get("capacity_factor", 1.0)) * k * group / n))
        # Priority within a group: every choice-0 assignment in token order, then choice 1...
        groups = tokens // group
        by_priority = routes.reshape(groups, group, k).transpose(1, 2).reshape(groups, -1)
        one_hot = torch.nn.functional.one_hot(by_priority, n)
        rank_in_expert = (one_hot.cumsum(dim=1) * one_hot).sum(-1) - 1
        kept_by_priority = (
            torch.ones_like(rank_in_expert, dtype=torch.bool)
            if capacity is None
            else rank_in_expert < capacity
        )
        kept = kept_by_priority.reshape(groups, k, group).transpose(1, 2).reshape(tokens, k)
        counts = torch.bincount(routes.reshape(-1), minlength=n)
        kept_counts = torch.bincount(routes[kept], minlength=n)
        return probs, lse, routes, gates, q[:, 0], kept, counts, kept_counts

    def forward(self, x, profile=False):
        """The layer on the rank's tokens ``x`` (``[T, D]`` or ``[S, B, D]``): the dict of
        ``MoeLayer.forward`` as torch tensors (``y``, ``route_prob_sum``, ``aux_loss`` and
        ``z_loss`` differentiable)."""
        if not isinstance(x, torch.Tensor):
            # Host arrays become a leaf whose gradient `backward` returns.
            x = torch.from_numpy(np.asarray(x, np.float32)).requires_grad_(torch.is_grad_enabled())
        given = x
        shape = x.shape
        d_model = self.router_weight.shape[1]
        if x.dim() not in (2, 3) or shape[-1] != d_model:
            raise ValueError(
                f"x: shape {tuple(shape)}, expected [T, {d_model}] or [S, B, {d_model}]"
            )
        x = x.reshape(-1, d_model)
        if not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).any(dim=1).nonzero()[0])
            raise ValueError(f"x: non-finite value in token {bad}")
        times = {} if profile else None
        c, k = self.config, int(self.config["top_k"])
        with _timed(times, "route"):
            probs, lse, routes, gates, prob_max, kept, counts, kept_counts = self._route(x)
            # Kept assignments by destination rank, then assignment order (token, choice).
            assignment = torch.arange(routes.numel(), device=x.device).reshape(routes.shape)[kept]
            expert = routes[kept]
            owner, first = self._owner.to(x.device), self._first.to(x.device)
            destination = owner[expert]
            send = torch.argsort(destination * routes.numel() + assignment)
            send_assignment = assignment[send]
            send_expert = expert[send]
            send_counts = torch.bincount(destination, minlength=self.world_size)
        with _timed(times, "exchange"):
            recv_counts = torch.empty_like(send_counts)
            dist.all_to_all_single(recv_counts, send_counts, group=self.group)
            send_sizes, recv_sizes = send_counts.tolist(), recv_counts.tolist()
            local = (send_expert - first[send_expert]).contiguous()
            recv_expert = local.new_empty(sum(recv_sizes))
            dist.all_to_all_single(recv_expert, local, recv_sizes, send_sizes, group=self.group)
            rows = x.index_select(0, send_assignment // k)
            received = _Exchange.apply(self.group, rows, send_sizes, recv_sizes)
        with _timed(times, "experts"):
            outputs = _LocalExperts.apply(self, received, recv_expert, *self._expert_parameters())
        with _timed(times, "exchange"):
            returned = _Exchange.apply(self.group, outputs, recv_sizes, send_sizes)
        with _timed(times, "combine"):
            per_assignment = x.new_zeros((routes.numel(), x.shape[1]))
            per_assignment = per_assignment.index_copy(0, send_assignment, returned)
            per_assignment = per_assignment.reshape(routes.shape[0], k, -1)
            # s = g, or g / stop_gradient(g) (value 1, gradient 1/g) without scaling.
            scale = gates if c["scale_by_prob"] else gates / gates.detach()
            scale = scale * kept
            y = x.new_zeros(x.shape)
            for j in range(k):
                y = y + scale[:, j : j + 1] * per_assignment[:, j]
            none_kept = ~kept.any(dim=1)
            if c.get("drop_policy", "pass_through") == "pass_through" and bool(none_kept.any()):
                pi = prob_max if c["scale_by_prob"] else prob_max / prob_max.detach()
                y = torch.where(none_kept[:, None], pi[:, None] * x, y)
            tokens = x.shape[0]
            route_prob_sum = probs.sum(dim=0)
            n = self.num_experts
            aux_loss = n * ((counts.to(x.dtype) / tokens) * (route_prob_sum / tokens)).sum()
            z_loss = (lse * lse).mean()
        self.last_times = times
        # Rows that left for other ranks and came from them, both exchanges.
        row_bytes = x.shape[1] * x.element_size()
        remote_sent = sum(send_sizes) - send_sizes[self.rank]
        remote_received = sum(recv_sizes) - recv_sizes[self.rank]
        self.last_bytes = {
            # Rows out to other ranks' experts plus outputs back to other ranks' tokens;
            # as many bytes arrive.
            "sent": (remote_sent + remote_received) * row_bytes,
            "tokens": tokens,
        }
        out = {
            "y": y.reshape(shape),
            "routes": routes,
            "gates": gates,
            "route_prob_max": prob_max.detach(),
            "counts": counts,
            "kept": kept_counts,
            "route_prob_sum": route_prob_sum,
            "n_dropped": int((~kept).sum()),
            "aux_loss": aux_loss,
            "z_loss": z_loss,
        }
        self._last = (given, out)
        return out

    def backward(self, dy, aux_loss_coef=0.0, z_loss_coef=0.0):
        """The gradients of ``Σ dy ⊙ y + α·aux_loss + β·z_loss`` (summed over the ranks)
        for the last forward, as ``MoeLayer.backward`` gives them: ``x`` (when it requires
        a gradient: host arrays do) and the rank's parameters under their native names
        (the router's all-reduced; the experts' those of the rank's own slice). Every rank
        calls it once per forward."""
        if self._last is None:
            raise RuntimeError("backward needs a forward first")
        x, out = self._last
        self._last = None
        return self.named_gradients(out, dy, aux_loss_coef, z_loss_coef, x)

    def named_gradients(self, out, dy, aux_loss_coef=0.0, z_loss_coef=0.0, x=None):
        """The gradients of ``Σ dy ⊙ y + α·aux_loss + β·z_loss`` (summed over the ranks)
        for a forward's ``out``: ``x`` (when given, with ``requires_grad``) and the rank's
        parameters under their native names, as numpy arrays. Every rank calls it."""
        loss = (out["y"] * torch.as_tensor(dy)).sum()
        loss = loss + aux_loss_coef * out["aux_loss"] + z_loss_coef * out["z_loss"]
        names = ["router.weight"] + (["router.bias"] if self.router_bias is not None else [])
        names += self._expert_names
        inputs = [getattr(self, name.replace(".", "_")) for name in names]
        if x is not None and x.requires_grad:
            names, inputs = ["x"] + names, [x] + inputs
        grads = torch.autograd.grad(loss, inputs, allow_unused=True)
        return {
            name: (np.zeros(tuple(t.shape), np.float32) if g is None else host(g))
            for name, t, g in zip(names, inputs, grads)
        }
