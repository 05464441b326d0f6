"""Muon for the blocks' weight matrices, AdamW for everything else: one optimizer (`Muon`).

Muon (Keller Jordan 2024; as nanochat and modded-nanogpt train): Nesterov momentum on the
gradient, then the update is orthogonalised, its singular values pushed towards 1 by a few
Newton–Schulz iterations, so every direction of the matrix moves by about the same amount
however lopsided the gradient is. It suits the 2-D hidden matrices (Q/K/V/out, the FFN);
the embedding, the LM head, biases and LayerNorms stay on AdamW, written out here too so that
one optimizer holds every state (one state_dict: exact resume, FSDP's gathered state).

Each group has `lr` (set every step by the schedule) and `lr_ratio` (its peak over the
schedule's peak: `optim.set_lr` multiplies), so Muon's lr (~0.02) and AdamW's (~1e-3) follow
one schedule.

Under FSDP a parameter and its gradient are DTensors sharded on dim 0: the momentum stays a
local shard, the update is gathered whole (every rank gets the same full matrix),
orthogonalised, and each rank keeps its own rows, so the result equals one process's.

>>> import torch
>>> from dtl import ModelConfig, TransformerLM
>>> model = TransformerLM(ModelConfig.preset("tiny", vocab_size=100))
>>> opt = build_muon(model, lr=1e-3, muon_lr=0.02, weight_decay=0.1)
>>> [g["use_muon"] for g in opt.param_groups]  # blocks' matrices; head, embedding, scalars
[True, False, False, False]
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.adamw import adamw as adamw_update  # the functional form

# The quintic iteration's coefficients (Keller Jordan's): chosen to raise small singular
# values fast; the result's singular values land in about [0.7, 1.2], not exactly 1, which
# trains as well as exact orthogonalisation at a fraction of the cost.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """About U @ V.T of `g` = U S V.T (a 2-D tensor): its singular values moved near 1.
    Computed in `g`'s dtype (fp32 for fp32 parameters); `newton_schulz_batched` of one.

    >>> x = newton_schulz(torch.randn(8, 4))
    >>> bool(((torch.linalg.svdvals(x) - 1).abs() < 0.35).all())
    True
    """
    return newton_schulz_batched([g], steps)[0]


def ns_dtype_for(precision: str) -> torch.dtype | None:
    """The dtype Newton–Schulz runs in for a run in `precision` (resolved): bf16 for a bf16
    run (as modded-nanogpt runs it: its matmuls ~2.3x faster on a CPU with AVX512-BF16, and
    the iteration only needs singular values near 1, which bf16 keeps; measured in
    docs/benchmarks.md), the parameters' own (None) otherwise, so fp32 stays exact fp32.

    >>> ns_dtype_for("bf16"), ns_dtype_for("fp32")
    (torch.bfloat16, None)
    """
    return torch.bfloat16 if precision == "bf16" else None


def is_muon_param(name: str, p: nn.Parameter) -> bool:
    """A block's weight matrix (attention Q/K/V/out, FFN): Muon's. Everything else: AdamW's."""
    return p.dim() == 2 and name.startswith("transformer_blocks.")


def build_muon(
    model: nn.Module,
    lr: float,
    muon_lr: float = 0.02,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    momentum: float = 0.95,
    embed_lr: float | None = None,
    head_lr: float | None = None,
    scalar_lr: float | None = None,
    momentum_start: float | None = None,
    momentum_warmup: int = 0,
    ns_dtype: torch.dtype | None = None,
) -> Muon:
    """Muon over the blocks' matrices; AdamW for the rest, in groups with their own peak lr
    (None: `lr`), as nanochat and modded-nanogpt tune them: the LM head's matrix (decayed),
    the token embedding, and the scalars (biases, LayerNorms). Muon's momentum rises from
    `momentum_start` to `momentum` over the first `momentum_warmup` steps. `ns_dtype`: the
    dtype Newton–Schulz runs in (`ns_dtype_for`; None: the parameters').

    Groups, in this order (empty ones left out): muon, head, embedding, scalars.
    """
    muon, head, embed, scalars = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if is_muon_param(name, p):
            muon.append(p)
        elif p.dim() >= 2 and "embedding" not in name:
            head.append(p)  # the LM head's matrix
        elif "embedding" in name:
            embed.append(p)
        else:
            scalars.append(p)
    start = momentum if momentum_start is None else momentum_start

    def adamw(params: list, peak: float | None, decay: float, role: str) -> dict:
        ratio = (lr if peak is None else peak) / lr  # optim.set_lr: lr = schedule x ratio
        return {
            "params": params,
            "use_muon": False,
            "lr_ratio": ratio,
            "weight_decay": decay,
            "role": role,
        }

    groups = [
        {
            "params": muon,
            "use_muon": True,
            "lr_ratio": muon_lr / lr,
            "weight_decay": 0.0,
            "momentum_start": start,
            "momentum_warmup": momentum_warmup,
        },
        adamw(head, head_lr, weight_decay, "head"),
        adamw(embed, embed_lr, 0.0, "embed"),
        adamw(scalars, scalar_lr, 0.0, "scalar"),
    ]
    kept = [g for g in groups if g["params"]]
    return Muon(kept, lr=lr, betas=betas, momentum=momentum, ns_dtype=ns_dtype)


def set_peak_lrs(optimizer: torch.optim.Optimizer, lr: float, peaks: dict[str, float]) -> None:
    """Re-aim the head's and embedding's groups at new peak lrs (`peaks["head_lr"]`,
    `peaks["embed_lr"]`; the schedule's peak is `lr`): what a --max-time run does once its
    first steps are timed and it knows whether it will repeat its data. The ratios live in
    the optimizer's groups, so a checkpoint keeps them and a resume goes on with them."""
    for group in optimizer.param_groups:
        role = group.get("role")
        if role in ("head", "embed"):
            group["lr_ratio"] = peaks[f"{role}_lr"] / lr


def momentum_at(step: int, momentum: float, start: float, warmup: int) -> float:
    """Muon's momentum at its `step`-th update (0-based): linear from `start` to `momentum`
    over `warmup` updates, then `momentum` (low momentum early follows the fast-changing
    gradients of a fresh model; modded-nanogpt: 0.85 -> 0.95 over 300 steps).

    >>> momentum_at(0, 0.95, 0.85, 300), round(momentum_at(150, 0.95, 0.85, 300), 9)
    (0.85, 0.9)
    >>> momentum_at(300, 0.95, 0.85, 300), momentum_at(5, 0.95, 0.85, 0)
    (0.95, 0.95)
    """
    if warmup <= 0 or step >= warmup:
        return momentum
    return start + (momentum - start) * step / warmup


class Muon(torch.optim.Optimizer):
    """Muon for groups with `use_muon=True`, AdamW (decoupled decay) for the others.

    Muon step for a matrix W (out, in) with gradient G (momentum: `momentum_at` this step):
        B <- momentum * B + G;  U = G + momentum * B   (Nesterov)
        W <- W * (1 - lr * wd) - lr * sqrt(max(1, out / in)) * newton_schulz(U)
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        ns_steps: int = 5,
        ns_dtype: torch.dtype | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            momentum=momentum,
            momentum_start=momentum,  # no warmup unless a group sets it
            momentum_warmup=0,
            ns_steps=ns_steps,
            use_muon=False,
            lr_ratio=1.0,
        )
        super().__init__(params, defaults)
        # Not a group setting: it follows the run's precision, so a checkpoint does not carry
        # it and a resume in another precision uses its own.
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if group["use_muon"]:
                self._muon_group(params, group)
            else:
                self._adamw_group(params, group)
        return loss

    def _muon_group(self, params: list[torch.Tensor], group: dict) -> None:
        """One Muon step of a group's matrices: the momentum by foreach ops (one call for all
        of them, not one per matrix), then the matrices of one shape orthogonalised together
        (`newton_schulz_batched`)."""
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
                state["step"] = torch.tensor(0.0)  # a tensor, as AdamW's: FSDP's state dict
            # A checkpoint from before the momentum warmup has no count: its warmup is over.
            state.setdefault("step", torch.tensor(float(group["momentum_warmup"])))
        # Each matrix's momentum at its own update count (the same for all but after a
        # change of groups): the matrices that share one are updated together.
        counts = torch.stack([self.state[p]["step"] for p in params]).tolist()  # one read
        by_mu: dict[float, list[int]] = {}  # momentum -> the indices of its matrices
        for i, count in enumerate(counts):
            mu = momentum_at(
                int(count), group["momentum"], group["momentum_start"], group["momentum_warmup"]
            )
            by_mu.setdefault(mu, []).append(i)
        updates: list[torch.Tensor] = [params[0]] * len(params)  # each filled below
        for mu, idx in by_mu.items():
            grads = [params[i].grad for i in idx]
            bufs = [self.state[params[i]]["momentum_buffer"] for i in idx]
            torch._foreach_add_([self.state[params[i]]["step"] for i in idx], 1.0)
            torch._foreach_mul_(bufs, mu)  # B <- mu B + G
            torch._foreach_add_(bufs, grads)
            # U = G + mu B (Nesterov)
            for i, u in zip(idx, torch._foreach_add(grads, bufs, alpha=mu), strict=True):
                updates[i] = u
        fulls = [_full(u) for u in updates]  # (out, in), whole under FSDP
        orthos = newton_schulz_batched(fulls, group["ns_steps"], self.ns_dtype)
        lr, decay = group["lr"], group["weight_decay"]
        if decay:
            torch._foreach_mul_(params, 1 - lr * decay)
        by_scale: dict[float, tuple[list, list]] = {}
        for p, full, ortho in zip(params, fulls, orthos, strict=True):
            scale = max(1.0, full.size(0) / full.size(1)) ** 0.5
            ps, os_ = by_scale.setdefault(scale, ([], []))
            ps.append(p)
            os_.append(_like(ortho, p))  # this rank's rows under FSDP
        for scale, (ps, os_) in by_scale.items():
            torch._foreach_add_(ps, os_, alpha=-lr * scale)

    def _adamw_group(self, params: list[torch.Tensor], group: dict) -> None:
        """One AdamW step (decoupled decay) of a group: torch's own functional AdamW, fused
        (one kernel over all the group's tensors) where it can be (`_adamw_kernel`)."""
        for p in params:
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        foreach, fused = _adamw_kernel(params)
        adamw_update(
            params,
            [p.grad for p in params],
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [],
            [s["step"] for s in states],
            foreach=foreach,
            fused=fused,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )


def newton_schulz_batched(
    mats: list[torch.Tensor], steps: int = 5, dtype: torch.dtype | None = None
) -> list[torch.Tensor]:
    """`newton_schulz` of each matrix, the matrices of one (wide) shape stacked and iterated
    together: one batched matmul per product instead of one per matrix (a model's blocks
    have a handful of shapes, so ~20 matrices take 3-4 batches). `dtype`: the iteration's
    (None: the matrices'); the results come back in the matrices' dtype.

    >>> a, b = torch.randn(4, 8), torch.randn(8, 4)  # b is tall: iterated as its (4, 8) .T
    >>> [tuple(x.shape) for x in newton_schulz_batched([a, b])]
    [(4, 8), (8, 4)]
    """
    wide = [m.T if m.size(0) > m.size(1) else m for m in mats]
    buckets: dict[tuple, list[int]] = {}
    for i, m in enumerate(wide):
        buckets.setdefault((tuple(m.shape), m.dtype, m.device), []).append(i)
    out: list[torch.Tensor] = [mats[0]] * len(mats)
    for idx in buckets.values():
        x = torch.stack([wide[i] for i in idx])  # (n, rows, cols), rows <= cols
        ortho = _ns_stacked(x if dtype is None else x.to(dtype), steps).to(x.dtype)
        for i, o in zip(idx, ortho.unbind(0), strict=True):
            out[i] = o.T if mats[i].size(0) > mats[i].size(1) else o
    return out


def _ns_stacked(x: torch.Tensor, steps: int, eps: float = 1e-7) -> torch.Tensor:
    """The quintic iteration on a stack of wide matrices (n, rows, cols): each scaled to
    norm 1 (singular values <= 1, where it converges), then X <- a X + (b G + c G^2) X with
    G = X X^T, the smaller Gram matrix of the wide form."""
    a, b, c = NS_COEFFS
    norms = torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True)  # (n, 1, 1)
    x = x / (norms + eps)
    for _ in range(steps):
        gram = torch.bmm(x, x.mT)  # (n, rows, rows)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b G + c G @ G
        x = torch.baddbmm(x, poly, x, beta=a)  # a X + poly @ X
    return x


def _adamw_kernel(params: list[torch.Tensor]) -> tuple[bool, bool]:
    """(foreach, fused) for torch's functional AdamW over `params`, whose step counts are CPU
    tensors (as they always were: checkpoints hold them so). On a CPU: fused (one kernel over
    all the tensors) for plain tensors of one float dtype, foreach for FSDP's DTensors. On
    other devices, the per-tensor path as before: the fused and foreach kernels want the step
    counts on the parameters' device."""
    if any(p.device.type != "cpu" for p in params):
        return False, False
    first = params[0]
    plain = all(type(p) in (torch.nn.Parameter, torch.Tensor) for p in params)
    one_dtype = all(p.dtype == first.dtype and p.is_floating_point() for p in params)
    return not (plain and one_dtype), plain and one_dtype


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor (FSDP) gathered from every rank, a plain tensor as is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _like(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `p`: under FSDP, replicated then cut to p's placements (a local
    slice, no communication, since every rank holds the same `full`)."""
    if not hasattr(p, "device_mesh"):
        return full
    from torch.distributed.tensor import DTensor, Replicate

    replicated = DTensor.from_local(full, p.device_mesh, [Replicate()] * p.device_mesh.ndim)
    return replicated.redistribute(p.device_mesh, p.placements)
