"""Objectives: masked diffusion (MDLM, absorbing state), block diffusion (BD3-LM) and autoregressive.

The maths follows docs/design.md ("The diffusion maths"; every module agrees with it):
  forward process  each token becomes MASK with probability 1 - alpha(t), t ~ U(0, 1) per sequence
  SUBS             the model never predicts MASK; unmasked positions copy their input
  continuous NELBO L = E_t[ -alpha'(t) / (1 - alpha(t)) * sum_{masked i} -log p(x0_i | x_t) ] / L_seq
  T-step NELBO     L_T = sum_j E[(alpha(t_{j-1}) - alpha(t_j)) / (1 - alpha(t_j)) * sum_masked -log p]
                   with t_j = j / T;  L_T >= L_inf and decreases with T
BD3-LM (Arriola et al. 2025) splits the sequence into blocks of b tokens: one t per block, each block
noised independently and predicted from its noised self and the CLEAN blocks before it; its NELBO is the
sum of the blocks' MDLM NELBOs (b = L is MDLM, b = 1 is AR).
Shift (GPTConfig.shift, DiffuGPT): a shifted model predicts token i from the state at position i - 1,
like an AR model, so an AR checkpoint's head keeps its meaning when it is adapted to diffusion; the first
token is then given clean and not scored (`align_predictions`, `keep_clean_prefix`).
All losses are in nats per token; exp(loss) on held-out data is the perplexity (upper bound for the
diffusion objectives).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from kernels.attention import AttentionMask
from kernels.masking import apply_diffusion_mask

OBJECTIVES = ("ar", "mdlm", "bd3lm")
DIFFUSION_OBJECTIVES = ("mdlm", "bd3lm")
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
def next_token_logits(model, x: torch.Tensor, num_tokens: int | None = None) -> torch.Tensor:
    """(B, T) ids -> (B, T, V) fp32 logits of the next token at each position, over the real ids only.

    num_tokens: the tokenizer's real ids 0 .. num_tokens-1 (= the mask id, docs/design.md). The softmax runs
    over those rows only: the MASK row and the padding rows of the embedding are not text, so no
    probability goes to them, and a loss equals the exported Hugging Face model's (which has only the
    real rows). None: every row (a model without extra rows, e.g. OpenAI's GPT-2). In fp32 as the diffusion
    losses: a bf16 loss is quantised (steps of 2^-7 ~ 0.008 near 1.5 nats)."""
    logits = model(x)  # (B, T, V_emb)
    if num_tokens is not None and num_tokens < logits.size(-1):
        logits = logits[..., :num_tokens]  # (B, T, num_tokens)
    return logits.float()


def next_token_nll(model, x: torch.Tensor, y: torch.Tensor, num_tokens: int | None = None) -> torch.Tensor:
    """-log p(y | x) of each position, (B, T) nats, 0 where the target is -1 (padding); see next_token_logits.
    Every AR score (training loss, the bound evaluator, the generative-perplexity judge) is this."""
    logits = next_token_logits(model, x, num_tokens)
    return F.cross_entropy(logits.transpose(1, 2), y, ignore_index=-1, reduction="none")  # (B, T)


def ar_loss(model, x: torch.Tensor, y: torch.Tensor, num_tokens: int | None = None) -> torch.Tensor:
    """Next-token cross-entropy, nats per token over the targets that are not -1 (padding)."""
    return next_token_nll(model, x, y, num_tokens).sum() / (y != -1).sum()


def is_diffusion(objective: str) -> bool:
    """True for the masked-diffusion objectives (mdlm, bd3lm): their loss is a NELBO, their models
    predict MASKed tokens and are decoded by diffusion samplers."""
    return objective in DIFFUSION_OBJECTIVES


def forward_process(x0: torch.Tensor, schedule: NoiseSchedule, mask_id: int, seed: int,
                    num_steps: Optional[int] = None, t: Optional[torch.Tensor] = None, t_min: float = 1e-3,
                    antithetic: bool = True, masking_impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Noise each row of x0 (N, T) with its own time: -> (xt (N, T), token_weight (N, T) fp32), where
    token_weight is the NELBO weight of each masked token (0 where unmasked).

    num_steps=None: the continuous-time bound, t ~ U(t_min, 1), weight -alpha'(t) / (1 - alpha(t)).
    num_steps=T:    the T-step discrete bound; step j ~ U{1..T} per row and the sum over j becomes T
                    times its expectation, so each row is weighted by
                    T * (alpha(t_{j-1}) - alpha(t_j)) / (1 - alpha(t_j)).
    t (N,), if given, replaces the sampled times. seed fixes t (seed) and the mask (seed + 1).
    """
    N = x0.shape[0]
    gen = torch.Generator(device=x0.device).manual_seed(int(seed))
    if num_steps is None:
        if t is None:
            t = sample_times(N, gen, t_min, antithetic, x0.device)
        weight = schedule.continuous_loss_weight(t)
    else:
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1 (got {num_steps})")
        if t is None:
            u = sample_times(N, gen, 0.0, antithetic, x0.device)  # [0, 1)
            j = torch.clamp(torch.floor(u * num_steps) + 1, max=num_steps)  # step index 1..T
            t = j / num_steps
        s = t - 1.0 / num_steps
        weight = num_steps * (schedule.alpha(s) - schedule.alpha(t)) / (1 - schedule.alpha(t))
    return apply_diffusion_mask(x0, schedule.mask_prob(t), weight, mask_id, seed=int(seed) + 1, impl=masking_impl)


def align_predictions(h: torch.Tensor, shift: bool) -> torch.Tensor:
    """(B, T, C) final states of T positions -> (B, T, C) the state that predicts each position.

    Unshifted (MDLM as published): position i is predicted from its own state, h itself. Shifted
    (GPTConfig.shift, DiffuGPT): from the state of position i - 1, as in an AR model, so an AR model's
    head keeps its meaning. Position 0 then has no prediction: it gets zeros, and no caller may read it
    (losses keep position 0 clean, decoders need a prompt token)."""
    if not shift:
        return h
    return torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)  # (B, T, C): row i holds h[i - 1]


def block_diffusion_predictions(h: torch.Tensor, block_length: int, shift: bool) -> torch.Tensor:
    """(B, 2L, C) final states of one pass over [x_t ; x_0] (the "block_diffusion" mask) -> (B, L, C) the
    state predicting each noised position. Unshifted: its own state in the noised half. Shifted: a block's
    first token from the last CLEAN token before it (the x_0 half, as at decoding time, where the block
    before is final), the others from the noised token before them."""
    L = h.size(1) // 2
    noised = align_predictions(h[:, :L], shift)
    if not shift:
        return noised
    block_start = (torch.arange(L, device=h.device) % block_length == 0)[None, :, None]  # (1, L, 1)
    return torch.where(block_start, align_predictions(h[:, L:], shift), noised)  # (B, L, C)


def block_diffusion_states(model, xt: torch.Tensor, x0: torch.Tensor, block_length: int,
                           mask: Optional[AttentionMask] = None) -> torch.Tensor:
    """The one BD3-LM pass: the model on [x_t ; x_0] (B, 2L), positions 0..L-1 twice, under the
    "block_diffusion" mask (a noised block sees itself and the clean blocks before it; the clean half is
    block-causal) -> (B, L, C) the state predicting each noised position (block_diffusion_predictions).
    mask: another "block_diffusion" mask (attention annealing); None: the model's."""
    L = x0.size(1)
    positions = torch.arange(L, device=x0.device).repeat(2)  # (2L,): x_t and x_0 share positions
    mask = mask or AttentionMask("block_diffusion", block_length=block_length)
    h, _ = model.hidden_states(torch.cat([xt, x0], dim=1), mask=mask, positions=positions,
                               max_position=L - 1)  # (B, 2L, C)
    return block_diffusion_predictions(h, block_length, model.config.shift)  # (B, L, C)


def keep_clean_prefix(x0: torch.Tensor, xt: torch.Tensor, token_weight: torch.Tensor, n: int):
    """Leave the first n tokens of every row clean and unscored: the NELBO of the rest given them. A
    shifted model needs n >= 1 (nothing predicts position 0); for an unshifted one n = 1 scores the same
    tokens, which is how the two are compared on equal terms."""
    if n > 0:
        xt, token_weight = xt.clone(), token_weight.clone()
        xt[:, :n], token_weight[:, :n] = x0[:, :n], 0.0
    return xt, token_weight


def _subs_nelbo(model, x0: torch.Tensor, xt: torch.Tensor, token_weight: torch.Tensor, mask_id: int,
                run_model, clean_prefix: int = 0) -> torch.Tensor:
    """sum over masked tokens of weight * -log p_SUBS(x0 | x_t), divided by the number of scored tokens
    (all of them, less the clean prefix). run_model() -> (B, L, C): the state predicting each position
    of xt (align_predictions).

    Every position is scored and the unmasked ones weigh 0 (as MDLM does): selecting the masked ones
    (h[masked]) has a data-dependent shape, which makes the host wait for the GPU at every micro step and
    torch.compile recompile; the extra output-layer rows are the price."""
    B, L = x0.shape
    h = run_model()  # (B, L, C)
    # SUBS's -inf logits for MASK and the padding ids above it, as columns left out of the softmax
    logits = model.lm_head(h)[..., :mask_id]  # (B, L, mask_id)
    nll = F.cross_entropy(logits.flatten(0, 1).float(), x0.flatten(), reduction="none")  # (B * L,)
    weight = torch.where(xt == mask_id, token_weight, 0.0).flatten()  # (B * L,): 0 where nothing is predicted
    return (weight * nll).sum() / (B * (L - clean_prefix))


def _prefix_for(model, clean_prefix: int) -> int:
    """The clean prefix a loss keeps: at least one token for a shifted model (nothing predicts position 0)."""
    return max(clean_prefix, 1) if model.config.shift else clean_prefix


def anneal_mask(kind: str, block_length: int, future_attention: float, seed: int) -> Optional[AttentionMask]:
    """The training mask while attention anneals (DiffuGPT): each (query, later key) pair of `kind` stays
    visible with probability future_attention, drawn with `seed`; 1.0 -> None (the model's own mask)."""
    if future_attention >= 1.0:
        return None
    return AttentionMask(kind, block_length=block_length, future_attention=future_attention, future_seed=seed)


def masked_diffusion_loss(model, x0: torch.Tensor, schedule: NoiseSchedule, mask_id: int, seed: int,
                          num_steps: Optional[int] = None, t: Optional[torch.Tensor] = None,
                          t_min: float = 1e-3, antithetic: bool = True, masking_impl: str = "auto",
                          clean_prefix: int = 0, future_attention: float = 1.0) -> torch.Tensor:
    """MDLM NELBO of clean ids x0 (B, T), nats per token (a one-sample Monte-Carlo estimate).

    One t per sequence (B,); num_steps=None is the continuous-time bound, num_steps=T the T-step
    bound (see `forward_process`). seed fixes t (unless given), the mask and the annealing mask, so a
    step is reproducible. clean_prefix: score only the tokens after the first n, given them (a shifted
    model always keeps >= 1). future_attention < 1: attention annealing (`anneal_mask`).
    """
    n = _prefix_for(model, clean_prefix)
    xt, token_weight = forward_process(x0, schedule, mask_id, seed, num_steps, t, t_min, antithetic, masking_impl)
    xt, token_weight = keep_clean_prefix(x0, xt, token_weight, n)
    mask = anneal_mask(model.config.attention, model.config.block_length, future_attention, int(seed) + 2)
    return _subs_nelbo(model, x0, xt, token_weight, mask_id,
                       lambda: align_predictions(model.hidden_states(xt, mask=mask)[0], model.config.shift), n)


def block_diffusion_loss(model, x0: torch.Tensor, schedule: NoiseSchedule, mask_id: int, seed: int,
                         block_length: int, num_steps: Optional[int] = None, t: Optional[torch.Tensor] = None,
                         t_min: float = 1e-3, antithetic: bool = True, masking_impl: str = "auto",
                         clean_prefix: int = 0, future_attention: float = 1.0) -> torch.Tensor:
    """BD3-LM NELBO of clean ids x0 (B, L), nats per token: the sum of the per-block MDLM NELBOs
    (block i conditioned on the clean blocks before it) divided by the B * L scored tokens (less the
    clean prefix).

    One t per block: B * L / b times, antithetic over all of them; block i of a sequence is masked with
    probability 1 - alpha(t_i) and weighted as in `forward_process` (num_steps as in MDLM). t, if given,
    is (B, L // b) or (B * L // b,), block-major within a sequence. The model runs ONCE on [x_t ; x_0]
    (2L tokens, positions 0..L-1 twice) under the "block_diffusion" attention mask: a noised block sees
    itself and the clean blocks before it, the clean half is block-causal (kernels/attention.py).
    Its context block_size must hold L positions (not 2L). b = L gives masked_diffusion_loss exactly
    (same t, same mask); b = 1 is an AR model scored through MASK inputs.
    Shifted model: a block's first token is predicted from the last CLEAN token before it (the x_0
    half, as at decoding time, where the block before is final), the others from the noised token
    before them; with b = 1 that is exactly the AR loss. clean_prefix and future_attention as in MDLM.
    """
    B, L = x0.shape
    if block_length < 1 or L % block_length:
        raise ValueError(f"block diffusion needs a sequence length that is a multiple of block_length >= 1; "
                         f"got L={L}, block_length={block_length}")
    n_blocks = L // block_length
    if t is not None:
        if t.numel() != B * n_blocks:
            raise ValueError(f"t must hold one time per block: ({B}, {n_blocks}) values, got {tuple(t.shape)}")
        t = t.reshape(B * n_blocks)
    # each block is a row of its own: the masking kernel draws per-row probabilities and weights, and
    # the flat token order (hence every random draw) is that of x0 itself
    rows = x0.reshape(B * n_blocks, block_length)
    xt_rows, weight_rows = forward_process(rows, schedule, mask_id, seed, num_steps, t, t_min, antithetic,
                                           masking_impl)
    n = _prefix_for(model, clean_prefix)
    xt, token_weight = keep_clean_prefix(x0, xt_rows.view(B, L), weight_rows.view(B, L), n)

    mask = anneal_mask("block_diffusion", block_length, future_attention, int(seed) + 2)
    return _subs_nelbo(model, x0, xt, token_weight, mask_id,
                       lambda: block_diffusion_states(model, xt, x0, block_length, mask), n)


def diffusion_nelbo(model, x0: torch.Tensor, objective: str, schedule: NoiseSchedule, mask_id: int, seed: int,
                    block_length: int = 0, **kwargs) -> torch.Tensor:
    """The NELBO of a diffusion objective ("mdlm" | "bd3lm"; block_length for bd3lm); kwargs as in
    masked_diffusion_loss (num_steps, t, t_min, antithetic, masking_impl, clean_prefix, future_attention)."""
    if objective == "bd3lm":
        return block_diffusion_loss(model, x0, schedule, mask_id, seed, block_length, **kwargs)
    if objective == "mdlm":
        return masked_diffusion_loss(model, x0, schedule, mask_id, seed, **kwargs)
    raise ValueError(f"{objective!r} is not a diffusion objective; expected one of {DIFFUSION_OBJECTIVES}")


# ----------------------------------------------------------------------------- one entry for the loop
@dataclass
class ObjectiveConfig:
    name: str = "mdlm"  # ar | mdlm | bd3lm (block diffusion: blocks of model.block_length tokens)
    schedule: str = "loglinear"  # linear | loglinear | cosine (mdlm and bd3lm)
    t_min: float = 1e-3  # smallest diffusion time sampled (keeps the 1/t weight finite)
    antithetic: bool = True  # low-discrepancy sampling of t across the batch
    masking_impl: str = "auto"  # auto | triton | torch

    def __post_init__(self):
        if self.name not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.name!r}; expected one of {OBJECTIVES}")
        NoiseSchedule(self.schedule)  # validates the name

    def required_attention(self) -> tuple[str, ...]:
        """Attention kinds this objective can be trained with."""
        if self.name == "ar":
            return ("causal",)
        if self.name == "bd3lm":
            return ("block_causal",)
        return ("bidirectional", "block_causal")


def compute_loss(model, x: torch.Tensor, y: torch.Tensor, objective: ObjectiveConfig, mask_id: int,
                 seed: int, future_attention: float = 1.0) -> torch.Tensor:
    """Loss of one batch for any objective, nats per token. x, y: (B, T) with y = x shifted by one.
    future_attention < 1: attention annealing of a diffusion objective (`anneal_mask`)."""
    if objective.name == "ar":
        return ar_loss(model, x, y, num_tokens=mask_id)  # real ids are 0 .. mask_id-1
    return diffusion_nelbo(model, x, objective.name, NoiseSchedule(objective.schedule), mask_id, seed,
                           block_length=model.config.block_length, t_min=objective.t_min,
                           antithetic=objective.antithetic, masking_impl=objective.masking_impl,
                           future_attention=future_attention)
