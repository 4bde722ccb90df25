"""The first-use check of impl="auto": the Triton kernels are trusted on a device only after they have agreed
with the PyTorch reference there once.

On CPU the kernels run in the Triton interpreter (tests/conftest.py) and `_kernel_device` is pointed at it,
so "auto" treats CPU tensors as it treats CUDA ones. A wrong kernel is made by perturbing the real kernel's
output (forward or backward) or by making it raise; the check itself runs unchanged.
"""
import warnings

import pytest
import torch

import kernels.attention as attn_mod
import kernels.masking as mask_mod
from kernels.attention import AttentionMask, attention, attention_reference
from kernels.masking import apply_diffusion_mask, apply_diffusion_mask_reference

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(not (CUDA or attn_mod.INTERPRET), reason="needs a GPU or TRITON_INTERPRET=1")


@pytest.fixture
def fresh_checks(monkeypatch):
    """"auto" may pick the kernels for this device, and no case has been checked yet."""
    monkeypatch.setattr(attn_mod, "_kernel_device", lambda q: True)
    monkeypatch.setattr(attn_mod, "_KERNEL_CHECKS", {})
    monkeypatch.setattr(mask_mod, "_kernel_device", lambda x0: True)
    monkeypatch.setattr(mask_mod, "_MASKING_CHECKS", {})


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts calls of the Triton attention path (the check's and the model's)."""
    calls = []
    real = attn_mod.flash_attention
    monkeypatch.setattr(attn_mod, "flash_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


def _qkv(T=40, D=16, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    return tuple(torch.randn(1, 2, T, D, generator=gen).to(DEVICE, dtype) for _ in range(3))


def _perturb_forward(monkeypatch, how):
    real = attn_mod._flash_forward

    def wrong(*args, **kwargs):
        out, lse = real(*args, **kwargs)
        return how(out), lse
    monkeypatch.setattr(attn_mod, "_flash_forward", wrong)


def _guard_warnings(record):
    return [w for w in record if issubclass(w.category, RuntimeWarning) and "diffusionGPT" in str(w.message)]


def test_a_correct_kernel_passes_its_check_and_auto_then_uses_it(fresh_checks, kernel_calls):
    q, k, v = _qkv()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(2):
            out = attention(q, k, v, AttentionMask("causal"), impl="auto")
    assert not _guard_warnings(record)
    assert len(kernel_calls) == 1 + 2  # the check once, then both calls
    (check,) = attn_mod.kernel_checks()
    assert check.ok and check.key[:4] == (str(q.device), torch.float32, "causal", 16)
    torch.testing.assert_close(out, attention_reference(q, k, v, AttentionMask("causal")), atol=2e-5, rtol=1e-4)


def test_a_wrong_forward_is_caught_warned_about_once_and_the_reference_used(fresh_checks, kernel_calls, monkeypatch):
    def off_by_a_bit(out):  # one wrong row per (batch, head): a bug in a tile's tail, say
        out = out.clone()
        out[:, :, -1] += 0.3
        return out
    _perturb_forward(monkeypatch, off_by_a_bit)
    q, k, v = _qkv()
    mask = AttentionMask("causal")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        first = attention(q, k, v, mask, impl="auto")
        second = attention(q, k, v, mask, impl="auto")
    (warning,) = _guard_warnings(record)  # once, not once per call
    text = str(warning.message)
    assert "causal attention in float32, head dim 16" in text
    assert "forward output was off by up to 0.3" in text and "tolerance 4e-05 + 0.0002 x |reference|" in text
    assert "uses the reference for this case" in text and "Please report it" in text
    assert len(kernel_calls) == 1  # only the check ran the kernel
    want = attention_reference(q, k, v, mask)
    assert torch.equal(first, want) and torch.equal(second, want)
    (check,) = attn_mod.kernel_checks()
    assert not check.ok
    # the kernel itself is still there for whoever asks for it explicitly (never checked, never replaced)
    attention(q, k, v, mask, impl="triton")
    assert len(kernel_calls) == 2


def test_a_wrong_gradient_is_caught(fresh_checks, monkeypatch):
    real = attn_mod._flash_backward

    def wrong_dk(*args, **kwargs):
        dq, dk, dv = real(*args, **kwargs)
        return dq, dk * 1.5, dv
    monkeypatch.setattr(attn_mod, "_flash_backward", wrong_dk)
    q, k, v = _qkv()
    with pytest.warns(RuntimeWarning, match=r"its dk was off by up to"):
        attention(q, k, v, AttentionMask("bidirectional"), impl="auto")


def test_nan_and_exceptions_fail_the_check(fresh_checks, monkeypatch):
    _perturb_forward(monkeypatch, lambda out: out * float("nan"))
    q, k, v = _qkv()
    with pytest.warns(RuntimeWarning, match=r"its forward output had NaN/inf"):
        out = attention(q, k, v, AttentionMask("causal"), impl="auto")
    assert torch.isfinite(out).all()

    def broken(*args, **kwargs):
        raise RuntimeError("PTX JIT compilation failed")
    monkeypatch.setattr(attn_mod, "_flash_forward", broken)
    with pytest.warns(RuntimeWarning, match=r"it raised RuntimeError: PTX JIT compilation failed"):
        attention(q, k, v, AttentionMask("bidirectional"), impl="auto")


def test_rounding_within_the_stated_tolerance_passes(fresh_checks, monkeypatch):
    _perturb_forward(monkeypatch, lambda out: out + 1e-5)  # below 4e-5 + 2e-4 |ref|
    q, k, v = _qkv()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        attention(q, k, v, AttentionMask("causal"), impl="auto")
    assert not _guard_warnings(record) and attn_mod.kernel_checks()[0].ok


def test_every_case_is_checked_once_on_a_problem_of_its_own_kind(fresh_checks, monkeypatch):
    seen = []
    real = attn_mod.check_kernel
    monkeypatch.setattr(attn_mod, "check_kernel", lambda key, bl=16: seen.append((key, bl)) or real(key, bl))
    q, k, v = _qkv(T=32)
    lengths = torch.tensor([20], device=DEVICE)
    calls = [AttentionMask("causal"), AttentionMask("causal"), AttentionMask("bidirectional"),
             AttentionMask("block_causal", block_length=8), AttentionMask("causal", key_lengths=lengths),
             AttentionMask("block_diffusion", block_length=8), AttentionMask("block_causal", block_length=8)]
    for mask in calls:
        attention(q, k, v, mask, impl="auto")
    attention(q[:, :, -4:], k, v, AttentionMask("causal", q_offset=28), impl="auto")  # a KV-cache step
    kinds = [(key[2], key[4], key[6]) for key, _ in seen]
    assert kinds == [("causal", False, False), ("bidirectional", False, False), ("block_causal", False, False),
                     ("causal", True, False), ("block_diffusion", False, False), ("causal", False, True)]
    assert [bl for key, bl in seen if key[2] == "block_diffusion"] == [8]
    assert all(c.ok for c in attn_mod.kernel_checks())


def test_the_check_runs_under_no_grad_inference_mode_and_autocast(fresh_checks):
    q, k, v = _qkv()
    with torch.inference_mode(), torch.autocast(DEVICE, enabled=False):
        attention(q, k, v, AttentionMask("causal"), impl="auto")
    (check,) = attn_mod.kernel_checks()
    assert check.ok, check.detail


def test_the_reference_path_is_never_checked(fresh_checks, kernel_calls):
    q, k, v = _qkv()
    attention(q, k, v, AttentionMask("causal"), impl="torch")
    big = torch.randn(1, 1, 8, 256, device=DEVICE)  # head dim 256: the kernel cannot run it, nothing to check
    attention(big, big, big, AttentionMask("causal"), impl="auto")
    assert kernel_calls == [] and attn_mod.kernel_checks() == []


# ----------------------------------------------------------------------------- the masking kernel
def _mask_batch():
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 50, (3, 200), generator=gen).to(DEVICE)
    return x0, torch.tensor([0.2, 0.5, 0.9], device=DEVICE), torch.tensor([1.0, 2.0, 3.0], device=DEVICE)


def test_a_correct_masking_kernel_passes_and_auto_uses_it(fresh_checks):
    x0, p, w = _mask_batch()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = apply_diffusion_mask(x0, p, w, mask_id=99, seed=3, impl="auto")
    assert not _guard_warnings(record)
    (check,) = mask_mod.masking_checks()
    assert check.ok, check.detail
    want = apply_diffusion_mask(x0, p, w, mask_id=99, seed=3, impl="triton")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("bug, match", [
    (lambda xt, w: (xt, w * 1.01), r"token_weight off by up to"),
    (lambda xt, w: (torch.zeros_like(xt), w), r"xt differs from x0 at unmasked positions"),
    (lambda xt, w: (xt.roll(1, dims=1), w.roll(1, dims=1)), r"unmaskable tokens were masked"),
], ids=["weight", "ids", "ignores_maskable"])
def test_a_wrong_masking_kernel_is_caught_and_the_reference_used(fresh_checks, monkeypatch, bug, match):
    real = mask_mod._apply_diffusion_mask_triton
    monkeypatch.setattr(mask_mod, "_apply_diffusion_mask_triton", lambda *a, **kw: bug(*real(*a, **kw)))
    x0, p, w = _mask_batch()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(2):
            got = apply_diffusion_mask(x0, p, w, mask_id=99, seed=3, impl="auto")
    (warning,) = _guard_warnings(record)
    assert "diffusion-masking kernel broke its contract" in str(warning.message)
    assert "Please report it" in str(warning.message)
    assert mask_mod.masking_checks()[0].detail and not mask_mod.masking_checks()[0].ok
    import re
    assert re.search(match, str(warning.message))
    want = apply_diffusion_mask_reference(x0, p, w, mask_id=99, seed=3)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_a_compiled_caller_checks_once_eagerly_then_traces_the_verdict_without_graph_breaks(fresh_checks, monkeypatch):
    monkeypatch.setattr(attn_mod, "flash_attention", lambda q, k, v, mask, scale=None: attention_reference(q, k, v, mask, scale))
    q, _, _ = _qkv()

    def layer(q):
        return attention(q, q, q, AttentionMask("causal"), impl="auto") * 2

    first = torch._dynamo.explain(layer)(q)
    assert first.graph_break_count == 1  # the check runs eagerly (torch.compiler.disable), once
    steady = torch._dynamo.explain(layer)(q)
    assert steady.graph_break_count == 0 and steady.graph_count == 1
    assert [c.ok for c in attn_mod.kernel_checks()] == [True]
