"""Distillation through time for masked diffusion (SDTT: Deschenaux & Gulcehre, "Beyond Autoregression: Fast
LLMs via Self-Distillation Through Time", ICLR 2025): a student learns to do in ONE ancestral step what its
frozen teacher does in TWO, so it samples as well with half the model calls. Rounds repeat it (training/
distillation.py): each round's student is the next round's teacher, halving the steps every time.

The sampler being distilled is the project's MDLM ancestral sampler (inference/ancestral_rows.py): N steps
on the grid t_j = j / N, each still-masked token unmasked from t to s < t with probability
(alpha_s - alpha_t) / (1 - alpha_t), to a token drawn from p(x0 | x_t) (SUBS). One training example:

    t      a point of the STUDENT's grid, t = j / N with j ~ U{1..N} per sequence (antithetic over the batch)
    x_t    the data noised to time t (models.diffusion.forward_process)
    teacher, two steps of size 1 / (2N), from t to t - 1/(2N) to t - 1/N:
      p1   = p_teacher(x0 | x_t); the tokens the first step unmasks are drawn from it -> x_mid
      p2   = p_teacher(x0 | x_mid)
      target of each token masked in x_t: p1 where the first step unmasked it, else p2 (the distribution
      the teacher's two steps drew it from, or will draw it from once the second step has given it the
      tokens of the first as context)
    student, one step: q = p_student(x0 | x_t)
    loss   the divergence between target and q, averaged over the tokens masked in x_t

What the teacher's second step unmasks does not change any target (those tokens and the ones left masked
both take p2), so only the first step is sampled. Divergences (SDTT's options):
    kl          KL(target || q): forward KL, mass-covering (the default)
    reverse_kl  KL(q || target): mode-seeking (the SDTT code's released setting)
    tvd         total variation, 0.5 * sum |target - q|
    mse         mean squared difference of the log-probabilities
Distributions are over the tokenizer's real ids 0 .. mask_id - 1 (SUBS: never MASK nor padding). Our GPT
takes no time input, so t enters only through which tokens are masked and which the teacher unmasks.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from models.diffusion import NoiseSchedule, align_predictions, forward_process, keep_clean_prefix, sample_times

DIVERGENCES = ("kl", "reverse_kl", "tvd", "mse")


def grid_times(batch: int, num_steps: int, generator: torch.Generator, antithetic: bool = True,
               device="cpu") -> torch.Tensor:
    """(B,) times on the N-step sampling grid: t = j / N, j in 1..N, uniform (antithetic across the batch)."""
    u = sample_times(batch, generator, 0.0, antithetic, device)  # [0, 1)
    j = torch.clamp(torch.floor(u * num_steps) + 1, max=num_steps)  # (B,) step index 1..N
    return j / num_steps


def unmask_probability(schedule: NoiseSchedule, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """(B,) probability that a token masked at time t is unmasked by time s < t: (alpha_s - alpha_t) / (1 - alpha_t),
    1 at s <= 0 (the ancestral sampler's rule, inference.ancestral_rows.ancestral_commit_probability, per row)."""
    t, s = t.double(), s.double()
    p = (schedule.alpha(s.clamp(min=0.0)) - schedule.alpha(t)) / (1 - schedule.alpha(t))
    return torch.where(s <= 0, torch.ones_like(p), p).float()


def token_log_probs(model, x: torch.Tensor, mask_id: int, where: torch.Tensor) -> torch.Tensor:
    """(B, T) ids -> (N, mask_id) log p(x0 | x) over the real ids (SUBS: MASK and padding get nothing) at the
    N positions `where` (B, T) marks, each predicted from its own state or, shifted, the one before it."""
    h = align_predictions(model.hidden_states(x)[0], model.config.shift)  # (B, T, C)
    return F.log_softmax(model.lm_head(h[where])[..., :mask_id].float(), dim=-1)  # (N, V_real)


def draw_tokens(log_probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(N, V) log-probabilities -> (N,) one token per row, exactly distributed (Gumbel-max: argmax of
    log p + Gumbel noise), drawn from `generator` so a step is reproducible."""
    u = torch.rand(log_probs.shape, generator=generator, device=log_probs.device, dtype=torch.float64)
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))  # (N, V)
    return torch.argmax(log_probs.double() + gumbel, dim=-1)


@torch.no_grad()
def teacher_targets(teacher, xt: torch.Tensor, t: torch.Tensor, student_steps: int, schedule: NoiseSchedule,
                    mask_id: int, generator: torch.Generator) -> torch.Tensor:
    """(N, mask_id) the teacher's log-probabilities for the N tokens masked in xt (B, T), after its two steps
    t -> t - 1/(2N) -> t - 1/N (module docstring): p1 for the tokens its first step unmasks, p2 = p(x0 | x_mid)
    for every other one."""
    half = 1.0 / (2 * student_steps)
    masked = xt == mask_id  # (B, T)
    p1 = token_log_probs(teacher, xt, mask_id, masked)  # (N, V_real)
    commit_p = unmask_probability(schedule, t, t - half)  # (B,)
    u = torch.rand(xt.shape, generator=generator, device=xt.device)  # (B, T)
    first = masked & (u < commit_p[:, None])  # (B, T) unmasked by the first step
    first_of_masked = first[masked]  # (N,)
    x_mid = xt.clone()
    x_mid[first] = draw_tokens(p1[first_of_masked], generator)
    p2 = token_log_probs(teacher, x_mid, mask_id, masked)  # (N, V_real)
    return torch.where(first_of_masked[:, None], p1, p2)


def divergence(name: str, target: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """(N, V) log-probabilities of the target and the student -> (N,) divergence per token (DIVERGENCES)."""
    if name == "kl":
        return (target.exp() * (target - student)).sum(-1)
    if name == "reverse_kl":
        return (student.exp() * (student - target)).sum(-1)
    if name == "tvd":
        return 0.5 * (target.exp() - student.exp()).abs().sum(-1)
    if name == "mse":
        return ((student - target) ** 2).mean(-1)
    raise ValueError(f"unknown divergence {name!r}; expected one of {', '.join(DIVERGENCES)}")


def distillation_loss(student, teacher, x0: torch.Tensor, schedule: NoiseSchedule, mask_id: int, seed: int,
                      student_steps: int, divergence_name: str = "kl", antithetic: bool = True,
                      masking_impl: str = "auto", clean_prefix: int = 0,
                      t: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The mean divergence, over the tokens masked in x_t, between the teacher's two steps and the student's
    one step (module docstring) on clean ids x0 (B, T); the student takes N = student_steps steps.

    seed fixes t (unless given), the mask (seed + 1) and the teacher's draws (seed + 2), so a step is
    reproducible and resumable. clean_prefix as in models.diffusion.masked_diffusion_loss (a shifted model
    keeps >= 1 token clean: nothing predicts position 0)."""
    if student_steps < 1:
        raise ValueError(f"student_steps must be >= 1 (got {student_steps})")
    gen = torch.Generator(device=x0.device).manual_seed(int(seed))
    if t is None:
        t = grid_times(x0.shape[0], student_steps, gen, antithetic, x0.device)  # (B,)
    xt, _ = forward_process(x0, schedule, mask_id, seed, t=t, masking_impl=masking_impl)
    n = max(clean_prefix, 1) if student.config.shift else clean_prefix
    xt, _ = keep_clean_prefix(x0, xt, torch.zeros_like(xt, dtype=torch.float32), n)
    masked = xt == mask_id  # (B, T)
    if not bool(masked.any()):
        # nothing masked -> nothing to match; keep the graph alive so every rank runs backward
        return student.lm_head.weight.sum() * 0.0
    teacher_gen = torch.Generator(device=x0.device).manual_seed(int(seed) + 2)
    target = teacher_targets(teacher, xt, t, student_steps, schedule, mask_id, teacher_gen)  # (N, V_real)
    q = token_log_probs(student, xt, mask_id, masked)  # (N, V_real)
    return divergence(divergence_name, target, q).mean()
