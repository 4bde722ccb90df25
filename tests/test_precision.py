"""Which half precision "auto" means on each kind of GPU, simulated on CPU: torch.cuda answers as a GPU of
the named generation would (is_available, and is_bf16_supported, which counts emulation unless asked
not to: a V100 or T4 says True by default and False with including_emulation=False)."""
import contextlib

import pytest
import torch

from common.precision import autocast, half_dtype
from training.config import load_config
from training.engines.ds_config import load_ds_json, resolve
from training.engines.fsdp_engine import resolve_fsdp

GPUS = {  # name: (native bf16, emulated bf16)
    "A100 (sm_80)": (True, True),
    "V100 (sm_70)": (False, True),
    "T4 (sm_75)": (False, True),
}


@pytest.fixture(params=GPUS)
def gpu(request, monkeypatch):
    native, emulated = GPUS[request.param]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: native or (including_emulation and emulated))
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch, "autocast", lambda device_type, dtype: ("autocast", device_type, dtype))
    return native


def test_deepspeed_trains_in_bf16_only_where_it_is_native_else_fp16_with_dynamic_loss_scaling(gpu):
    cfg, explicit = load_config(None, [])
    resolved = resolve(load_ds_json("ds_configs/zero2.json"), cfg, explicit, 1, source="zero2.json")
    assert cfg.dtype == ("bf16" if gpu else "fp16")
    assert resolved.config["bf16"]["enabled"] is gpu
    assert resolved.config["fp16"]["enabled"] is (not gpu)
    assert resolved.config["fp16"].get("loss_scale", 0) == 0  # 0: DeepSpeed's dynamic loss scaling


def test_fsdp_trains_in_bf16_only_where_it_is_native_else_fp32(gpu):
    cfg, _ = load_config(None, ["--engine=fsdp"])
    resolve_fsdp(cfg, 1)
    assert cfg.dtype == ("bf16" if gpu else "fp32")  # FSDP here has no loss scaling for fp16


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_sampling_and_serving_autocast_to_bf16_only_where_it_is_native(gpu, device):
    want = torch.bfloat16 if gpu else torch.float16
    assert half_dtype(device) == want
    assert autocast(device, "auto") == ("autocast", "cuda", want)  # sample, serve and the decoding bench
    assert autocast(device, "float16") == ("autocast", "cuda", torch.float16)  # stated: kept
    assert isinstance(autocast(device, "float32"), contextlib.nullcontext)
    assert isinstance(autocast("cpu", "auto"), contextlib.nullcontext)  # a CPU model stays fp32
