"""Specification of the objectives: noise schedules, forward masking, SUBS, NELBO bounds, AR loss."""
import math

import pytest
import torch

from models.diffusion import (NoiseSchedule, ObjectiveConfig, ar_loss, compute_loss, masked_diffusion_loss,
                              sample_times, subs_logits)
from kernels.masking import apply_diffusion_mask
from models.gpt import GPT, GPTConfig

VOCAB, MASK_ID = 32, 31  # ids 0..30 are "real", 31 is MASK (DESIGN.md: mask id = tokenizer vocab size)
SCHEDULES = ["linear", "loglinear", "cosine"]


def tiny_model(attention="bidirectional", seed=0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=16, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32, attention=attention))


def arithmetic_sequences(n: int, length: int = 16, seed: int = 0) -> torch.Tensor:
    """x_i = (a + i * b) mod 31: any two visible tokens determine the rest, so context really helps."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, MASK_ID, (n, 1), generator=g)
    b = torch.randint(1, 4, (n, 1), generator=g)
    return (a + b * torch.arange(length)) % MASK_ID


# ----------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_starts_clean_and_decreases(name):
    s = NoiseSchedule(name)
    t = torch.linspace(0, 1, 101)
    a = s.alpha(t)
    assert a[0] == pytest.approx(1.0)
    assert a[-1] <= 1e-3 + 1e-9  # (almost) everything masked at t = 1
    assert torch.all(a[1:] < a[:-1])


@pytest.mark.parametrize("name", SCHEDULES)
def test_alpha_derivative_matches_finite_differences(name):
    s = NoiseSchedule(name)
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    h = 1e-6
    numeric = (s.alpha(t + h) - s.alpha(t - h)) / (2 * h)
    torch.testing.assert_close(s.alpha_derivative(t), numeric, rtol=1e-6, atol=1e-6)  # fd error ~h^2


def test_unknown_schedule_and_objective_are_rejected():
    with pytest.raises(ValueError, match="unknown noise schedule"):
        NoiseSchedule("quadratic")
    with pytest.raises(ValueError, match="unknown objective"):
        ObjectiveConfig(name="sedd")


def test_antithetic_times_cover_the_unit_interval_evenly():
    t = sample_times(8, torch.Generator().manual_seed(0), t_min=0.0)
    gaps = torch.sort(t).values.diff()
    torch.testing.assert_close(gaps, torch.full_like(gaps, 1 / 8))  # one per 1/8-interval


# ----------------------------------------------------------------------------- forward process
@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_masking_rate_matches_one_minus_alpha(name, t):
    s = NoiseSchedule(name)
    x0 = torch.randint(0, MASK_ID, (64, 256))
    tt = torch.full((64,), t)
    xt, w = apply_diffusion_mask(x0, s.mask_prob(tt), s.continuous_loss_weight(tt), MASK_ID, seed=7)
    p = float(s.mask_prob(torch.tensor(t)))
    n = x0.numel()
    rate = (xt == MASK_ID).float().mean().item()
    assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / n)  # 5 sigma of a binomial proportion
    unmasked = xt != MASK_ID
    assert torch.equal(xt[unmasked], x0[unmasked])  # unmasked tokens are untouched
    assert torch.all(w[unmasked] == 0) and torch.all(w[~unmasked] > 0)


# ----------------------------------------------------------------------------- SUBS
def test_model_never_assigns_probability_to_mask():
    model = tiny_model()
    logits = subs_logits(model(torch.full((2, 16), MASK_ID)), MASK_ID)
    probs = logits.softmax(-1)
    assert torch.all(probs[..., MASK_ID:] == 0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 16))


# ----------------------------------------------------------------------------- NELBO
@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("num_steps", [None, 8])
def test_nelbo_is_non_negative(name, num_steps):
    loss = masked_diffusion_loss(tiny_model(), arithmetic_sequences(8), NoiseSchedule(name), MASK_ID, seed=3,
                                 num_steps=num_steps)
    assert torch.isfinite(loss) and loss.item() >= 0


def test_nelbo_is_zero_when_nothing_is_masked():
    x0 = arithmetic_sequences(4)
    loss = masked_diffusion_loss(tiny_model(), x0, NoiseSchedule("loglinear"), MASK_ID, seed=0,
                                 t=torch.zeros(4))  # alpha(0) = 1: no token is masked
    assert loss.item() == 0.0


def test_nelbo_of_a_uniform_model_is_log_vocab():
    """A model that knows nothing predicts uniformly over the 31 real ids: -log p = log 31 for every
    masked token, and the NELBO weights integrate to one token's worth, so L = log 31 in expectation."""
    model = tiny_model()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # all logits 0 -> uniform after SUBS removes MASK
    losses = [masked_diffusion_loss(model, arithmetic_sequences(64), NoiseSchedule("linear"), MASK_ID, seed=s).item()
              for s in range(20)]
    assert sum(losses) / len(losses) == pytest.approx(math.log(MASK_ID), rel=0.05)  # MC error ~1-2%


def test_steps_below_one_are_rejected():
    with pytest.raises(ValueError, match="num_steps"):
        masked_diffusion_loss(tiny_model(), arithmetic_sequences(2), NoiseSchedule(), MASK_ID, 0, num_steps=0)


# ----------------------------------------------------------------------------- learning
def train(model, objective: str, x: torch.Tensor, steps: int, lr=3e-3) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    obj = ObjectiveConfig(name=objective)
    losses = []
    for step in range(steps):
        loss = compute_loss(model, x[:, :-1], x[:, 1:], obj, MASK_ID, seed=step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_ar_model_overfits_one_batch():
    torch.manual_seed(0)
    x = torch.randint(0, MASK_ID, (4, 17))  # random tokens: only memorisation brings the loss down
    model = tiny_model(attention="causal").train()
    losses = train(model, "ar", x, 200)
    assert losses[0] > 3.0 and losses[-1] < 0.1  # from ~log 32 to memorised


def test_diffusion_model_overfits_one_batch():
    torch.manual_seed(0)
    x = torch.randint(0, MASK_ID, (4, 17))
    model = tiny_model().train()
    losses = train(model, "mdlm", x, 300)
    # the NELBO is a noisy one-sample estimate: compare averages of the first and last 20 steps
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert first > 2.5 and last < 0.3 * first


def test_ar_loss_ignores_padding_targets():
    model = tiny_model(attention="causal")
    x = arithmetic_sequences(2)
    y = torch.roll(x, -1, dims=1)
    y_pad = y.clone()
    y_pad[:, 8:] = -1
    logits = model(x)
    expected = torch.nn.functional.cross_entropy(logits[:, :8].reshape(-1, VOCAB), y[:, :8].reshape(-1))
    torch.testing.assert_close(ar_loss(model, x, y_pad), expected)


@pytest.fixture(scope="module")
def trained_diffusion_model():
    """A tiny MDLM trained on arithmetic sequences, where context makes masked tokens predictable."""
    model = tiny_model()
    data = arithmetic_sequences(512, 17, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(300):
        batch = data[(step * 32) % 512:(step * 32) % 512 + 32, :16]
        loss = masked_diffusion_loss(model, batch, NoiseSchedule("loglinear"), MASK_ID, seed=step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_discrete_bound_is_above_continuous_and_decreases_with_steps(trained_diffusion_model):
    """L_T >= L_inf and L_T decreases in T. Monte-Carlo estimates over the same held-out batch with
    common random numbers (same seeds for every T); differences are checked against 3 standard errors."""
    x0 = arithmetic_sequences(256, 16, seed=99)
    schedule = NoiseSchedule("loglinear")
    seeds = range(1000, 1040)

    def estimate(num_steps):
        with torch.no_grad():
            return torch.tensor([masked_diffusion_loss(trained_diffusion_model, x0, schedule, MASK_ID, seed=s,
                                                       num_steps=num_steps).item() for s in seeds])

    bounds = {T: estimate(T) for T in (2, 8, 64)}
    bounds[math.inf] = estimate(None)
    order = [2, 8, 64, math.inf]
    for coarse, fine in zip(order, order[1:]):
        diff = bounds[coarse] - bounds[fine]  # paired samples: the same seeds
        stderr = diff.std() / math.sqrt(len(diff))
        assert diff.mean() > -3 * stderr, f"L_{coarse}={bounds[coarse].mean():.4f} < L_{fine}={bounds[fine].mean():.4f}"
    assert bounds[2].mean() > bounds[math.inf].mean()  # the coarsest bound is clearly looser
