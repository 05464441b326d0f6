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

# The quintic iteration's coefficients (Keller Jordan's): chosen to raise small singular
# values fast; the result's singular values land in about [0.7, 1.2], not exactly 1, which
# trains as well as exact orthogonalisation at a fraction of the cost.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """About U @ V.T of `g` = U S V.T (a 2-D tensor): its singular values moved near 1.

    Computed in `g`'s dtype (fp32 for fp32 parameters).
    """
    a, b, c = NS_COEFFS
    x = g / (g.norm() + eps)  # singular values <= 1, where the iteration converges
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the wide form: X @ X.T is then the smaller Gram matrix
        x = x.T
    for _ in range(steps):
        gram = x @ x.T  # (rows, rows)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


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
) -> Muon:
    """Muon over the blocks' matrices; AdamW for the rest, in groups with their own peak lr
    (None: `lr`), as nanochat and modded-nanogpt tune them: the LM head's matrix (decayed),
    the token embedding, and the scalars (biases, LayerNorms). Muon's momentum rises from
    `momentum_start` to `momentum` over the first `momentum_warmup` steps.

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
    return Muon([g for g in groups if g["params"]], lr=lr, betas=betas, momentum=momentum)


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

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["use_muon"]:
                    self._muon_step(p, group)
                else:
                    self._adamw_step(p, group)
        return loss

    def _muon_step(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
            state["step"] = torch.tensor(0.0)  # a tensor, as AdamW's: FSDP's state dict
        # A checkpoint from before the momentum warmup has no count: its warmup is over.
        count = state.setdefault("step", torch.tensor(float(group["momentum_warmup"])))
        step = int(count.item())
        count += 1
        mu = momentum_at(step, group["momentum"], group["momentum_start"], group["momentum_warmup"])
        buf = state["momentum_buffer"]
        buf.mul_(mu).add_(p.grad)
        update = p.grad.add(buf, alpha=mu)
        full = _full(update)  # (out, in), whole on every rank under FSDP
        ortho = newton_schulz(full, group["ns_steps"])
        ortho = _like(ortho, p)  # this rank's rows under FSDP
        scale = max(1.0, full.size(0) / full.size(1)) ** 0.5
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(ortho, alpha=-group["lr"] * scale)

    def _adamw_step(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        step = state["step"].item()
        beta1, beta2 = group["betas"]
        lr, grad = group["lr"], p.grad
        p.mul_(1 - lr * group["weight_decay"])
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias1, bias2 = 1 - beta1**step, 1 - beta2**step
        denom = (state["exp_avg_sq"] / bias2).sqrt_().add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-lr / bias1)


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
