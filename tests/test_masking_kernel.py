"""The fused diffusion-masking kernel (and its PyTorch reference) as a specification.

Without a GPU the Triton path runs in the interpreter on CPU tensors (tests/conftest.py); with a
GPU the same tests run compiled on CUDA.
"""
import math

import pytest
import torch

import kernels.masking as masking_mod
from kernels.masking import apply_diffusion_mask, apply_diffusion_mask_reference

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
MASK_ID = 50257
IMPLS = ["triton", "torch"]


def _batch(B=6, T=1000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, MASK_ID, (B, T), generator=gen).to(DEVICE)
    mask_prob = torch.tensor([0.0, 0.05, 0.3, 0.5, 0.9, 1.0][:B], device=DEVICE)
    loss_weight = torch.tensor([7.0, 20.0, 3.3, 2.0, 1.1, 1.0][:B], device=DEVICE)
    return x0, mask_prob, loss_weight


@pytest.mark.parametrize("impl", IMPLS)
def test_same_seed_same_mask_and_different_seeds_differ(impl):
    x0, p, w = _batch()
    a = apply_diffusion_mask(x0, p, w, MASK_ID, seed=123, impl=impl)
    b = apply_diffusion_mask(x0, p, w, MASK_ID, seed=123, impl=impl)
    c = apply_diffusion_mask(x0, p, w, MASK_ID, seed=124, impl=impl)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_fraction_matches_mask_prob(impl):
    x0, p, w = _batch(T=4000)
    xt, _ = apply_diffusion_mask(x0, p, w, MASK_ID, seed=5, impl=impl)
    rate = (xt == MASK_ID).double().mean(1).cpu()  # (B,) per-sequence masked fraction
    T = x0.shape[1]
    for b, pb in enumerate(p.tolist()):
        # 5 sigma of a binomial proportion over T tokens (false alarm ~ 6e-7 per row); exact at p=0, 1
        bound = 5 * math.sqrt(pb * (1 - pb) / T)
        assert abs(rate[b].item() - pb) <= bound + 1e-12, (b, pb, rate[b].item())


@pytest.mark.parametrize("impl", IMPLS)
def test_xt_and_token_weight_follow_the_mask(impl):
    x0, p, w = _batch()
    xt, weight = apply_diffusion_mask(x0, p, w, MASK_ID, seed=9, impl=impl)
    assert xt.dtype == x0.dtype and xt.shape == x0.shape
    assert weight.dtype == torch.float32 and weight.shape == x0.shape
    masked = xt == MASK_ID
    assert torch.equal(xt[~masked], x0[~masked])  # unmasked tokens untouched
    expected = torch.where(masked, w[:, None].expand_as(weight), torch.zeros_like(weight))
    assert torch.equal(weight, expected)


@pytest.mark.parametrize("impl", IMPLS)
def test_positions_that_are_not_maskable_are_never_masked(impl):
    x0, _, w = _batch()
    p = torch.ones(x0.shape[0], device=DEVICE)  # mask everything that may be masked
    gen = torch.Generator().manual_seed(3)
    maskable = (torch.rand(x0.shape, generator=gen) < 0.6).to(DEVICE)
    maskable[:, :17] = False  # a prompt
    xt, weight = apply_diffusion_mask(x0, p, w, MASK_ID, seed=1, maskable=maskable, impl=impl)
    assert torch.equal(xt == MASK_ID, maskable)
    assert torch.equal(xt[~maskable], x0[~maskable])
    assert torch.all(weight[~maskable] == 0)


def test_triton_mask_depends_only_on_seed_and_token_index():
    """Philox counter = flat token index: a row's mask does not depend on the batch it sits in."""
    x0, p, w = _batch()
    full, _ = apply_diffusion_mask(x0, p, w, MASK_ID, seed=77, impl="triton")
    same_rows, _ = apply_diffusion_mask(x0[:3], p[:3], w[:3], MASK_ID, seed=77, impl="triton")
    assert torch.equal(full[:3], same_rows)


def test_reference_draws_one_uniform_per_token_from_a_seeded_generator():
    x0, p, w = _batch(B=4, T=300)
    xt, _ = apply_diffusion_mask_reference(x0, p, w, MASK_ID, seed=11)
    u = torch.rand(x0.shape, generator=torch.Generator(device=DEVICE).manual_seed(11), device=DEVICE)
    assert torch.equal(xt == MASK_ID, u < p[:, None])


def test_auto_uses_triton_on_cuda_and_torch_elsewhere():
    x0, p, w = _batch(B=2, T=50)
    auto = apply_diffusion_mask(x0, p, w, MASK_ID, seed=4)
    want = apply_diffusion_mask(x0, p, w, MASK_ID, seed=4, impl="triton" if CUDA else "torch")
    assert torch.equal(auto[0], want[0]) and torch.equal(auto[1], want[1])


def test_odd_shapes_and_non_contiguous_ids():
    x0, p, w = _batch(B=3, T=1000)
    x0 = x0[:, ::3]  # (3, 334), non-contiguous
    xt, weight = apply_diffusion_mask(x0, p[:3], w[:3], MASK_ID, seed=2, impl="triton")
    masked = xt == MASK_ID
    assert torch.equal(xt[~masked], x0[~masked]) and masked[0].sum() == 0
    assert torch.equal(weight != 0, masked)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("make, error, match", [
    (lambda x0, p, w: dict(x0=x0.float()), TypeError, "integer token ids"),
    (lambda x0, p, w: dict(x0=x0[0]), ValueError, r"\(B, T\)"),
    (lambda x0, p, w: dict(mask_prob=p[:2]), ValueError, "mask_prob"),
    (lambda x0, p, w: dict(loss_weight=w.long()), TypeError, "loss_weight"),
    (lambda x0, p, w: dict(maskable=torch.ones_like(x0)), TypeError, "bool"),
    (lambda x0, p, w: dict(maskable=torch.ones(2, 2, dtype=torch.bool)), ValueError, "maskable"),
    (lambda x0, p, w: dict(seed=-1), ValueError, "seed"),
    (lambda x0, p, w: dict(seed=1.5), TypeError, "seed"),
    (lambda x0, p, w: dict(mask_id=2 ** 40, x0=x0.int()), ValueError, "mask_id"),
], ids=["float_ids", "1d_ids", "mask_prob_shape", "int_weight", "maskable_dtype", "maskable_shape",
        "negative_seed", "float_seed", "mask_id_overflow"])
def test_bad_inputs_raise_clear_errors(make, error, match, impl):
    x0, p, w = _batch(B=4, T=10)
    kwargs = dict(x0=x0, mask_prob=p, loss_weight=w, mask_id=MASK_ID, seed=0)
    kwargs.update(make(x0, p, w))
    with pytest.raises(error, match=match):
        apply_diffusion_mask(impl=impl, **kwargs)


def test_unknown_impl_and_cpu_without_interpreter_raise(monkeypatch):
    x0, p, w = _batch(B=2, T=10)
    with pytest.raises(ValueError, match="impl"):
        apply_diffusion_mask(x0, p, w, MASK_ID, seed=0, impl="cuda")
    monkeypatch.setattr(masking_mod, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="CUDA"):
        apply_diffusion_mask(x0.cpu(), p.cpu(), w.cpu(), MASK_ID, seed=0, impl="triton")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: checks the compiled kernel on large batches")
def test_compiled_kernel_on_a_large_batch_on_gpu():
    B, T = 64, 4096
    x0 = torch.randint(0, MASK_ID, (B, T), device="cuda")
    p = torch.linspace(0, 1, B, device="cuda")
    w = torch.rand(B, device="cuda")
    xt, weight = apply_diffusion_mask(x0, p, w, MASK_ID, seed=2 ** 40 + 3, impl="triton")
    rate = (xt == MASK_ID).double().mean(1)
    bound = 5 * torch.sqrt(p.double() * (1 - p.double()) / T) + 1e-12
    assert torch.all((rate - p.double()).abs() <= bound)
    assert torch.equal(weight != 0, (xt == MASK_ID) & (w[:, None] != 0))
