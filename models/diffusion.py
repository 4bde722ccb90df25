"""Objectives: masked diffusion (MDLM, absorbing state) and autoregressive, beside the model.

The maths follows ../shared/DESIGN.md (binding for every module):
  forward process  each token becomes MASK with probability 1 - alpha(t), t ~ U(0, 1) per sequence
  SUBS             the model never predicts MASK; unmasked positions copy their input
  continuous NELBO L = E_t[ -alpha'(t) / (1 - alpha(t)) * sum_{masked i} -log p(x0_i | x_t) ] / L_seq
  T-step NELBO     L_T = sum_j E[(alpha(t_{j-1}) - alpha(t_j)) / (1 - alpha(t_j)) * sum_masked -log p]
                   with t_j = j / T;  L_T >= L_inf and decreases with T
All losses are in nats per token; exp(loss) on held-out data is the perplexity (upper bound for MDLM).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from kernels.masking import apply_diffusion_mask

OBJECTIVES = ("ar", "mdlm")
SCHEDULES = ("linear", "loglinear", "cosine")


# ----------------------------------------------------------------------------- noise schedules
@dataclass(frozen=True)
class NoiseSchedule:
    """alpha(t): probability that a token is still clean at time t in [0, 1]; alpha(0) = 1.

    linear     alpha = 1 - t
    loglinear  alpha = 1 - (1 - eps) t            (MDLM's default; alpha(1) = eps, never fully masked)
    cosine     alpha = eps + (1 - eps) cos(pi t / 2)
    """

    name: str = "loglinear"
    eps: float = 1e-3

    def __post_init__(self):
        if self.name not in SCHEDULES:
            raise ValueError(f"unknown noise schedule {self.name!r}; expected one of {SCHEDULES}")

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        if self.name == "linear":
            return 1 - t
        if self.name == "loglinear":
            return 1 - (1 - self.eps) * t
        return self.eps + (1 - self.eps) * torch.cos(math.pi / 2 * t)

    def alpha_derivative(self, t: torch.Tensor) -> torch.Tensor:
        """d alpha / dt (negative: tokens only ever get masked as t grows)."""
        if self.name == "linear":
            return -torch.ones_like(t)
        if self.name == "loglinear":
            return -(1 - self.eps) * torch.ones_like(t)
        return -(1 - self.eps) * math.pi / 2 * torch.sin(math.pi / 2 * t)

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        return 1 - self.alpha(t)

    def continuous_loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """-alpha'(t) / (1 - alpha(t)): the NELBO weight of a masked token's -log p at time t."""
        return -self.alpha_derivative(t) / (1 - self.alpha(t))


def sample_times(batch: int, generator: torch.Generator, t_min: float = 1e-3, antithetic: bool = True,
                 device="cpu") -> torch.Tensor:
    """t ~ U(t_min, 1) per sequence, (B,). Antithetic (low-discrepancy) sampling spreads the batch evenly
    over [0, 1) from one random offset, which cuts the variance of the loss (MDLM, Sahoo et al. 2024).
    t_min keeps the 1/t weight of the continuous NELBO finite."""
    u = torch.rand(batch if not antithetic else 1, generator=generator, device=device)
    if antithetic:
        u = (u + torch.arange(batch, device=device) / batch) % 1.0  # (B,)
    return t_min + (1 - t_min) * u


# ----------------------------------------------------------------------------- SUBS parameterisation
def subs_logits(logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    """SUBS: the model never predicts MASK (nor the padding ids above it): their logits become -inf.
    The other half of SUBS (unmasked positions copy their input) is applied by whoever reads the
    prediction: the loss only scores masked positions, samplers never change unmasked ones."""
    logits = logits.clone()
    logits[..., mask_id:] = float("-inf")
    return logits


# ----------------------------------------------------------------------------- losses
def ar_loss(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, nats per token; targets of -1 are ignored (padding)."""
    logits = model(x)  # (B, T, V)
    return F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1), ignore_index=-1)


def masked_diffusion_loss(model, x0: torch.Tensor, schedule: NoiseSchedule, mask_id: int, seed: int,
                          num_steps: Optional[int] = None, t: Optional[torch.Tensor] = None,
                          t_min: float = 1e-3, antithetic: bool = True, masking_impl: str = "auto",
                          ) -> torch.Tensor:
    """MDLM NELBO of clean ids x0 (B, T), nats per token (a one-sample Monte-Carlo estimate).

    num_steps=None: the continuous-time bound, t ~ U(t_min, 1).
    num_steps=T:    the T-step discrete bound; step j ~ U{1..T} per sequence and the sum over j
                    becomes T times its expectation, so each sequence is weighted by
                    T * (alpha(t_{j-1}) - alpha(t_j)) / (1 - alpha(t_j)).
    seed fixes t (unless given) and the mask, so a step is reproducible.
    """
    B, L = x0.shape
    gen = torch.Generator(device=x0.device).manual_seed(int(seed))
    if num_steps is None:
        if t is None:
            t = sample_times(B, gen, t_min, antithetic, x0.device)
        weight = schedule.continuous_loss_weight(t)
    else:
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1 (got {num_steps})")
        if t is None:
            u = sample_times(B, gen, 0.0, antithetic, x0.device)  # [0, 1)
            j = torch.clamp(torch.floor(u * num_steps) + 1, max=num_steps)  # step index 1..T
            t = j / num_steps
        s = t - 1.0 / num_steps
        weight = num_steps * (schedule.alpha(s) - schedule.alpha(t)) / (1 - schedule.alpha(t))
    xt, token_weight = apply_diffusion_mask(x0, schedule.mask_prob(t), weight, mask_id,
                                            seed=int(seed) + 1, impl=masking_impl)
    masked = xt == mask_id  # (B, L)
    if not bool(masked.any()):
        # nothing masked -> nothing to predict; keep the graph alive so every rank runs backward
        return model.lm_head.weight.sum() * 0.0
    h, _ = model.hidden_states(xt)  # (B, L, C)
    logits = subs_logits(model.lm_head(h[masked]), mask_id)  # (N_masked, V): only masked positions matter
    nll = F.cross_entropy(logits.float(), x0[masked], reduction="none")  # (N_masked,)
    return (token_weight[masked] * nll).sum() / (B * L)


# ----------------------------------------------------------------------------- one entry for the loop
@dataclass
class ObjectiveConfig:
    name: str = "mdlm"  # ar | mdlm
    schedule: str = "loglinear"  # linear | loglinear | cosine (mdlm only)
    t_min: float = 1e-3  # smallest diffusion time sampled (keeps the 1/t weight finite)
    antithetic: bool = True  # low-discrepancy sampling of t across the batch
    masking_impl: str = "auto"  # auto | triton | torch

    def __post_init__(self):
        if self.name not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.name!r}; expected one of {OBJECTIVES}")
        NoiseSchedule(self.schedule)  # validates the name

    def required_attention(self) -> tuple[str, ...]:
        """Attention kinds this objective can be trained with."""
        return ("causal",) if self.name == "ar" else ("bidirectional", "block_causal")


def compute_loss(model, x: torch.Tensor, y: torch.Tensor, objective: ObjectiveConfig, mask_id: int,
                 seed: int) -> torch.Tensor:
    """Loss of one batch for any objective, nats per token. x, y: (B, T) with y = x shifted by one."""
    if objective.name == "ar":
        return ar_loss(model, x, y)
    return masked_diffusion_loss(model, x, NoiseSchedule(objective.schedule), mask_id, seed,
                                 t_min=objective.t_min, antithetic=objective.antithetic,
                                 masking_impl=objective.masking_impl)
