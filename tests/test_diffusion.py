"""Specification of the objectives: noise schedules, forward masking, SUBS, NELBO bounds, AR loss."""
import math

import pytest
import torch

from models.diffusion import (NoiseSchedule, ObjectiveConfig, ar_loss, block_diffusion_loss, compute_loss,
                              forward_process, is_diffusion, masked_diffusion_loss, sample_times, subs_logits)
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


# ----------------------------------------------------------------------------- block diffusion (BD3-LM)
def block_model(block_length: int, seed=0, attn_impl="torch") -> GPT:
    """Context 16 = the sequence length L: the [x_t ; x_0] input has 2L tokens but only L positions."""
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=16, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32, attention="block_causal",
                         block_length=block_length, attn_impl=attn_impl))


def naive_block_loss(model, x0, xt, token_weight, b) -> torch.Tensor:
    """The BD3-LM NELBO one block at a time: block i is predicted from [clean blocks < i, noised block i]
    with the model's plain block-causal mask (what block decoding sees), with the same mask and weights."""
    B, L = x0.shape
    total = torch.zeros(())
    for i in range(L // b):
        block = slice(i * b, (i + 1) * b)
        h, _ = model.hidden_states(torch.cat([x0[:, :i * b], xt[:, block]], dim=1))
        masked = xt[:, block] == MASK_ID
        logits = subs_logits(model.lm_head(h[:, i * b:][masked]), MASK_ID)
        nll = torch.nn.functional.cross_entropy(logits, x0[:, block][masked], reduction="none")
        total = total + (token_weight[:, block][masked] * nll).sum()
    return total / (B * L)


@pytest.mark.parametrize("b,num_steps,attn_impl", [(4, None, "torch"), (8, None, "torch"), (4, 8, "torch"),
                                                   (2, None, "triton")],
                         ids=["b4", "b8", "b4_T8", "b2_triton_kernel"])
def test_block_diffusion_loss_equals_a_naive_loop_over_blocks(b, num_steps, attn_impl):
    """The one vectorised pass over [x_t ; x_0] (block_diffusion mask, repeated positions) gives the loss
    of running every block on its clean prefix. fp32; the attention shapes differ, so only the summation
    order does: agreement to ~1e-7 observed, 1e-5 allowed. The triton case runs the flash-attention
    kernel (the interpreter on CPU) inside the model."""
    model = block_model(b, attn_impl=attn_impl)
    x0 = arithmetic_sequences(3, 16, seed=5)
    schedule = NoiseSchedule("loglinear")
    loss = block_diffusion_loss(model, x0, schedule, MASK_ID, seed=11, block_length=b, num_steps=num_steps)
    # the same noise, drawn the way the loss draws it: one row (and one t) per block
    xt, w = forward_process(x0.reshape(-1, b), schedule, MASK_ID, 11, num_steps)
    xt, w = xt.view(3, 16), w.view(3, 16)
    assert (xt == MASK_ID).any() and (xt != MASK_ID).any()
    for row, row_w in zip(xt.view(-1, b), w.view(-1, b)):  # one t per block: one weight per block
        assert row_w[row == MASK_ID].unique().numel() <= 1
    with torch.no_grad():
        naive = naive_block_loss(block_model(b), x0, xt, w, b)  # the reference always uses torch attention
    torch.testing.assert_close(loss.detach(), naive, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_steps", [None, 8])
def test_block_diffusion_with_one_block_is_mdlm(num_steps):
    """b = L: one block, no clean prefix, so BD3-LM is MDLM with the same t and the same mask (the masking
    draws follow x0's flat token order whatever the row split). fp32, different attention shapes: 1e-5."""
    model = block_model(16)
    x0 = arithmetic_sequences(4, 16, seed=2)
    schedule = NoiseSchedule("cosine")
    t = torch.tensor([0.2, 0.5, 0.7, 0.9])
    for kw in (dict(), dict(t=t)):
        got = block_diffusion_loss(model, x0, schedule, MASK_ID, seed=4, block_length=16, num_steps=num_steps,
                                   **kw)
        want = masked_diffusion_loss(model, x0, schedule, MASK_ID, seed=4, num_steps=num_steps, **kw)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_block_diffusion_gradients_flow_and_compute_loss_dispatches():
    model = block_model(4)
    x0 = arithmetic_sequences(4, 16, seed=3)
    objective = ObjectiveConfig(name="bd3lm")
    assert objective.required_attention() == ("block_causal",) and is_diffusion("bd3lm") and not is_diffusion("ar")
    loss = compute_loss(model, x0, x0, objective, MASK_ID, seed=9)
    torch.testing.assert_close(loss, block_diffusion_loss(model, x0, NoiseSchedule(), MASK_ID, 9, block_length=4))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.transformer.wpe.weight.grad.abs().sum() > 0 and model.lm_head.weight.grad.abs().sum() > 0


def test_block_diffusion_rejects_bad_shapes_and_the_context_holds_positions_not_tokens():
    model = block_model(4)
    with pytest.raises(ValueError, match="multiple of block_length"):
        block_diffusion_loss(model, arithmetic_sequences(2, 14), NoiseSchedule(), MASK_ID, 0, block_length=4)
    with pytest.raises(ValueError, match="one time per block"):
        block_diffusion_loss(model, arithmetic_sequences(2), NoiseSchedule(), MASK_ID, 0, block_length=4,
                             t=torch.rand(2))
    # 2L = 32 tokens through a 16-position context: fine when positions stay < 16, an error beyond
    x = arithmetic_sequences(1, 32)
    model.hidden_states(x, positions=torch.arange(16).repeat(2))
    with pytest.raises(ValueError, match="outside the model's context"):
        model.hidden_states(x[:, :17], positions=torch.arange(17))
    with pytest.raises(ValueError, match="longer than the model's context"):
        model.hidden_states(x)


@pytest.fixture(scope="module")
def trained_block_diffusion_model():
    """A tiny BD3-LM (b = 4) trained on arithmetic sequences; returns it with its training losses."""
    model = block_model(4)
    data = arithmetic_sequences(512, 17, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(200):
        batch = data[(step * 32) % 512:(step * 32) % 512 + 32, :16]
        loss = block_diffusion_loss(model, batch, NoiseSchedule("loglinear"), MASK_ID, seed=step, block_length=4)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model.eval(), losses


def test_block_diffusion_learns_and_its_discrete_bound_is_above_the_continuous_one(trained_block_diffusion_model):
    """Training lowers the NELBO; L_2 >= L_inf on held-out data (paired seeds, 3 standard errors)."""
    model, losses = trained_block_diffusion_model
    assert sum(losses[-20:]) / 20 < 0.7 * sum(losses[:20]) / 20  # ~3.4 -> ~2.0 observed
    x0 = arithmetic_sequences(128, 16, seed=99)
    schedule = NoiseSchedule("loglinear")

    def estimate(num_steps):
        with torch.no_grad():
            return torch.tensor([block_diffusion_loss(model, x0, schedule, MASK_ID, seed=s, block_length=4,
                                                      num_steps=num_steps).item() for s in range(1000, 1030)])

    coarse, fine = estimate(2), estimate(None)
    diff = coarse - fine
    assert diff.mean() > -3 * diff.std() / math.sqrt(len(diff)), (coarse.mean(), fine.mean())
    assert coarse.mean() > fine.mean()
