"""How the Triton kernels are launched (kernels/launch.py): on their tensors' GPU, within CUDA's grid limits,
and tuned once per autotune key even when several threads launch at once.

No GPU here, so each GPU condition is simulated where the launch path meets it:
- the current CUDA device: on CPU `torch.cuda.device_of` is a no-op, so a stand-in records which tensor's
  device each launch made current. That the real one switches the GPU is torch's contract;
  `python -m bench.gpu_check launch` samples on cuda:1 against cuda:0 where a machine has two GPUs.
- the grid: the grid each launch asks for is evaluated for every autotune config and checked against
  CUDA's per-axis limits (the launches are recorded, not run: 66,560 programs are too many for the
  interpreter). `bench.gpu_check launch` runs such a batch on a GPU against the reference.
- the autotuner: the interpreter runs kernels untuned, so Triton's real autotuner is built over a stand-in
  kernel (it records the tiles it is launched with) and a stand-in clock (bigger tiles time faster, as TF32
  tensor-core tiles do on a GPU).
"""
import math
import threading

import pytest
import torch

import kernels.attention as attn_mod
import kernels.launch as launch_mod
import kernels.masking as mask_mod
from kernels.attention import AttentionMask, attention_reference, flash_attention
from kernels.masking import apply_diffusion_mask

pytestmark = pytest.mark.skipif(not attn_mod.INTERPRET, reason="simulates on CPU what a GPU run does for real")
KERNELS = {"attention forward": (attn_mod, "_attn_fwd_kernel"), "attention dK/dV": (attn_mod, "_attn_bwd_dkdv_kernel"),
           "attention dQ": (attn_mod, "_attn_bwd_dq_kernel"), "diffusion masking": (mask_mod, "_diffusion_mask_kernel")}


class DeviceOf:
    """Stands in for torch.cuda.device_of: makes its tensor's device the (per-thread) current one."""
    current = threading.local()

    def __init__(self, tensor):
        self.device = tensor.device

    def __enter__(self):
        self.previous = getattr(DeviceOf.current, "device", None)
        DeviceOf.current.device = self.device

    def __exit__(self, *exc):
        DeviceOf.current.device = self.previous
        return False


class LaunchSpy:
    """Wraps a kernel: records (kernel, the current device, the grid callable) at each launch, then runs it
    unless `run` is False."""

    def __init__(self, name, kernel, log, run=True):
        self.name, self.kernel, self.log, self.run = name, kernel, log, run

    def __getitem__(self, grid):
        def launched(*args, **kwargs):
            self.log.append((self.name, getattr(DeviceOf.current, "device", None), grid))
            if self.run:
                return self.kernel[grid](*args, **kwargs)
        return launched


@pytest.fixture
def launches(monkeypatch):
    log = []
    monkeypatch.setattr(torch.cuda, "device_of", DeviceOf)
    for name, (module, attr) in KERNELS.items():
        monkeypatch.setattr(module, attr, LaunchSpy(name, getattr(module, attr), log))
    return log


def _attention_and_masking():
    """Every kernel once: attention forward + backward, then the masking kernel."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=gen).requires_grad_() for _ in range(3))
    flash_attention(q, k, v, AttentionMask("causal")).sum().backward()
    x0 = torch.randint(0, 50, (2, 30), generator=gen)
    apply_diffusion_mask(x0, torch.full((2,), 0.5), torch.ones(2), 50, seed=1, impl="triton")


@pytest.mark.parametrize("thread", ["main thread", "another thread (as the server's scheduler)"])
def test_every_kernel_launches_with_its_tensors_device_current(launches, thread):
    if thread == "main thread":
        _attention_and_masking()
    else:
        errors = []
        worker = threading.Thread(target=lambda: _run_catching(_attention_and_masking, errors))
        worker.start()
        worker.join(timeout=120)
        assert not worker.is_alive() and not errors, errors
    assert [name for name, _, _ in launches] == list(KERNELS)
    assert [device for _, device, _ in launches] == [torch.device("cpu")] * len(KERNELS)


def _run_catching(fn, errors):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - handed to the test thread
        errors.append(exc)


def test_the_scheduler_waits_for_the_models_gpu_not_the_current_one(monkeypatch):
    from inference.serving.scheduler import device_synchronizer
    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(device))
    device_synchronizer(torch.device("cuda", 1))()
    device_synchronizer(torch.device("cpu"))()
    assert waited == [torch.device("cuda", 1)]


# ----------------------------------------------------------------------------- the grid
def _grids(log, tuning_of):
    """Every grid the launches asked for, under each config the kernel could be tuned to."""
    grids = []
    for name, _, grid in log:
        for config in tuning_of[name].configs:
            grids.append((name, config.kwargs, grid(dict(config.kwargs))))
    return grids


def test_batch_times_heads_beyond_65535_stays_within_cudas_grid_limits(monkeypatch):
    """The lm-eval backend scores 64 requests x 65 rows at once: 4,160 sequences x 16 heads = 66,560 per launch,
    over the 65,535 programs CUDA allows on grid axes 1 and 2."""
    log = []
    monkeypatch.setattr(torch.cuda, "device_of", DeviceOf)
    for name in ("attention forward", "attention dK/dV", "attention dQ"):
        module, attr = KERNELS[name]
        monkeypatch.setattr(module, attr, LaunchSpy(name, getattr(module, attr), log, run=False))
    B, H, T, D = 64 * 65, 16, 3, 16
    q, k, v = (torch.zeros(B, H, T, D).requires_grad_() for _ in range(3))
    flash_attention(q, k, v, AttentionMask("causal")).sum().backward()
    tuning_of = {"attention forward": attn_mod._FWD_TUNING, "attention dK/dV": attn_mod._BWD_DKDV_TUNING,
                 "attention dQ": attn_mod._BWD_DQ_TUNING}
    grids = _grids(log, tuning_of)
    assert {name for name, _, _ in grids} == set(tuning_of)
    for name, tiles, grid in grids:
        assert len(grid) <= 3 and all(n <= limit for n, limit in zip(grid, launch_mod.CUDA_GRID_LIMITS)), \
            (name, tiles, grid)
        assert math.prod(grid) == B * H  # one program per sequence and head: T is shorter than any tile


def test_a_grid_over_cudas_limits_is_refused_in_words():
    assert attn_mod.attention_grid(64 * 65, 16, 100, 64) == (2, 16, 4160)  # (tiles, heads, batch)
    with pytest.raises(ValueError, match="the attention launch needs 70,000 programs on grid axis 2, over CUDA's "
                                         "limit of 65,535: split the call into smaller batches"):
        attn_mod.attention_grid(70000, 16, 100, 64)
    assert mask_mod.masking_grid(2049) == (3,)  # 1,024 tokens per program


# ----------------------------------------------------------------------------- autotuning
class StandInKernel:
    """What Triton's autotuner needs of a compiled kernel (argument names, `run`); records the tiles of each run."""

    def __init__(self, real):
        self.arg_names, self.fn = real.arg_names, real.fn
        self.runs = []

    def run(self, *args, grid, warmup, **kwargs):
        self.runs.append((kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["INPUT_PRECISION"]))


def _stand_in_tuner(monkeypatch, on_time=lambda: None):
    """The forward kernel's real autotuner (configs, key, pruner) over a stand-in kernel and clock: a tile of
    BLOCK_M x BLOCK_N times 1 / (BLOCK_M x BLOCK_N) ms, so the biggest tile the pruner keeps wins."""
    kernel = StandInKernel(attn_mod._attn_fwd_kernel)

    def clock(kernel_call, quantiles):
        kernel_call()
        on_time()
        bm, bn, _ = kernel.runs[-1]
        return [1.0 / (bm * bn)] * len(quantiles)
    tuner = attn_mod._FWD_TUNING.autotune(kernel, do_bench=clock)
    monkeypatch.setattr(attn_mod, "_attn_fwd_kernel", tuner)
    return tuner, kernel


def test_a_tile_tuned_for_tf32_is_not_reused_for_exact_fp32(monkeypatch):
    """Exact (IEEE) fp32 dots run on FMA units, where only small tiles fit in registers: the pruner keeps
    BLOCK_M x BLOCK_N <= 2048 at head dim 64. A TF32 call tuned first must not hand its big tile to them."""
    tuner, kernel = _stand_in_tuner(monkeypatch)
    q = torch.zeros(1, 2, 128, 64)
    monkeypatch.setattr(attn_mod, "_input_precision", lambda q: "tf32")
    flash_attention(q, q, q, AttentionMask("causal"))
    assert kernel.runs[-1] == (128, 128, "tf32")  # the biggest tile won
    monkeypatch.setattr(attn_mod, "_input_precision", lambda q: "ieee")
    flash_attention(q, q, q, AttentionMask("causal"))
    bm, bn, precision = kernel.runs[-1]
    assert precision == "ieee" and bm * bn <= 2048, (bm, bn)


def test_threads_launching_a_new_shape_at_once_tune_it_once(monkeypatch):
    """The first timing of the first tuning waits (up to 1 s) for a second tuning of the same key to start:
    two threads launching together would both tune, racing on the autotuner's state."""
    second_tuning = threading.Event()
    tunings = []

    def on_time():
        if len(kernel.runs) == 1:
            second_tuning.wait(timeout=1.0)
    tuner, kernel = _stand_in_tuner(monkeypatch, on_time)
    prune = tuner.early_config_prune

    def counting_prune(*args, **kwargs):
        tunings.append(threading.current_thread().name)
        if len(tunings) == 2:
            second_tuning.set()
        return prune(*args, **kwargs)
    tuner.early_config_prune = counting_prune

    q = torch.zeros(1, 2, 128, 64, dtype=torch.float16)
    errors = []
    threads = [threading.Thread(target=_run_catching, args=(lambda: flash_attention(q, q, q, AttentionMask("causal")),
                                                            errors), name=f"launcher {i}") for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert len(tunings) == 1, tunings
    timed = len(tuner.configs_timings)
    assert len(kernel.runs) == timed + 2  # each config timed once, then the two launches
    assert kernel.runs[-1] == kernel.runs[-2] == (128, 128, "ieee")


def test_threads_running_the_interpreted_kernels_at_once_get_the_reference_results():
    gen = torch.Generator().manual_seed(3)
    problems = [tuple(torch.randn(1, 2, 50, 16, generator=gen) for _ in range(3)) for _ in range(3)]
    masks = [AttentionMask("causal"), AttentionMask("bidirectional"), AttentionMask("block_causal", block_length=8)]
    results, errors = [None] * 3, []

    def work(i):
        results[i] = flash_attention(*problems[i], masks[i])
    threads = [threading.Thread(target=_run_catching, args=(lambda i=i: work(i), errors)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for (q, k, v), mask, got in zip(problems, masks, results):
        # fp32 over <= 50 keys: the kernel's error is ~1e-6 (tests/test_attention_kernel.py's TOL)
        torch.testing.assert_close(got, attention_reference(q, k, v, mask), atol=2e-5, rtol=1e-4)
