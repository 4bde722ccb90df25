"""bench/gpu_check.sh, the one command a GPU session runs, tested on CPU with --dry-run: every step's plumbing
(tiny shapes, the Triton steps in the interpreter), the carried-wheel install, the JSON + Markdown report,
and that a failing step is recorded and the run goes on (and ends non-zero)."""
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = ["env", "gpu-tests", "guard", "multi-gpu", "launch", "attention", "masking", "training", "decoding",
         "serving", "kernel-tests", "kernel-compile"]
pytestmark = pytest.mark.slow


def _probe_wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel, standing in for the carried DeepSpeed wheels."""
    folder.mkdir()
    path = folder / "gpu_check_probe-1.0-py3-none-any.whl"
    info = "gpu_check_probe-1.0.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("gpu_check_probe/__init__.py", "VERSION = '1.0'\n")
        z.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: gpu-check-probe\nVersion: 1.0\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return folder


def _run(*args, timeout=240):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script sets it itself
    env["PYTHON"] = sys.executable
    return subprocess.run(["bash", "bench/gpu_check.sh", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_dry_run_runs_every_step_and_writes_json_and_markdown(tmp_path):
    out = tmp_path / "out"
    done = _run("--dry-run", "--wheels", str(_probe_wheel(tmp_path / "wheels")), str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "every step passed" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.md", "raw.tar.gz"]

    report = json.loads((out / "gpu_check.json").read_text())
    assert [s["step"] for s in report["steps"]] == STEPS
    assert all(s["status"] == "ok" for s in report["steps"]), report["steps"]
    assert report["mode"].startswith("dry-run")
    # the carried wheel went into a temporary path first on PYTHONPATH
    assert report["wheels"] == ["gpu_check_probe-1.0-py3-none-any.whl"]
    assert "/site" in report["env"]["pythonpath"] and report["env"]["deepspeed_import"].startswith("ok")
    # every step left its numbers
    assert report["gpu_tests"]["passed"] > 0 and report["gpu_tests"]["failures"] == 0
    assert report["guard"]["checks"] and all(c["ok"] for c in report["guard"]["checks"])
    # 2 CPU ranks (ZeRO-2, the gloo group), then resumed on 1 rank from the step-10 checkpoint
    multi = report["multi_gpu"]
    assert multi["ranks"] == 2 and multi["status"] == "ok", multi
    assert set(multi["checks"]) == {"zero2_fp32_2_ranks", "resume_2_ranks_on_1"}
    assert multi["checks"]["resume_2_ranks_on_1"]["steps"] == 10
    # the launch checks: a batch x heads grid and (cpu standing in for both GPUs) sampling on a second device
    launch = {c["check"].split(" (")[0]: c["ok"] for c in report["launch"]["checks"]}
    assert launch == {"attention fwd+bwd with B x H = 3 x 2 = 6": True,
                      "attention first-use check on cpu, from a fresh thread": True,
                      "masking first-use check on cpu, from a fresh thread": True,
                      "model logits on cpu": True, "inference.sample --device cpu against cpu": True,
                      "autotuned attention configs compile without register spills on this GPU": None}
    assert [c["name"] for c in report["kernel_compile"]["cases"]] == \
        ["masking sm_80 i64 ids, maskable=True", "masking sm_90 i64 ids, maskable=True"]
    assert all(c["ok"] for c in report["kernel_compile"]["cases"])
    kinds = {(r["mask"], r["block_length"]) for r in report["attention"]["rows"]}
    assert kinds == {("causal", 0), ("bidirectional", 0), ("block_causal", 4), ("block_causal", 16),
                     ("block_diffusion", 16)}
    assert {r["mode"] for r in report["attention"]["rows"]} == {"fwd", "fwd+bwd"}
    assert report["masking"]["rows"][0]["triton_gb_s"] > 0
    assert set(report["training"]["results"]) == {"deepspeed zero0 attn=triton", "deepspeed zero2 attn=triton",
                                                  "deepspeed zero0 attn=torch", "deepspeed zero2 attn=torch"}
    losses = {round(v["last_loss"], 4) for v in report["training"]["results"].values()}
    assert len(losses) == 1  # same weights, same data: the Triton and PyTorch attention give the same loss
    assert any("KV cache" in r["name"] or "kv" in r["name"].lower() for r in report["decoding"]["rows"])
    # the real server under the official openai client, on a tiny export the tests keep
    (load,) = report["serving"]
    assert [level["concurrency"] for level in load["levels"]] == [1, 2]
    assert all(level["errors"] == 0 and level["requests"] == 6 and level["tokens"] > 0 for level in load["levels"])
    assert load["rounds"] == 2 and all(len(level["rounds_tokens_per_s"]) == 2 for level in load["levels"])
    assert report["kernel_tests"]["passed"] > 0

    md = (out / "gpu_check.md").read_text()
    for heading in ("| step | what | status |", "## First-use kernel checks", "## Kernel launches",
                    "## Kernels compiled for sm_80, sm_90", "## Multi-GPU training (2 rank(s), fp32", "## Attention",
                    "## Masking kernel", "## Training", "## Decoding", "## Server load (pre_restructure: mdlm"):
        assert heading in md
    with tarfile.open(out / "raw.tar.gz") as tar:
        names = tar.getnames()
    assert {f"raw/{s}.log" for s in STEPS} <= set(names)


def test_a_failing_step_is_recorded_the_run_goes_on_and_ends_non_zero(tmp_path):
    out = tmp_path / "out"
    done = _run("--dry-run", "--only", "training,masking", "--data", str(tmp_path / "no_such_data"), str(out))
    assert done.returncode == 1
    assert "!! training FAILED" in done.stdout and "FAILED or timed out: training" in done.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    status = {s["step"]: s["status"] for s in report["steps"]}
    assert status == {"env": "ok", "training": "FAILED (rc 1)", "masking": "ok"}  # masking ran after the failure
    assert any("no prepared data" in p for p in report["env"]["problems"])
    md = (out / "gpu_check.md").read_text()
    assert "### training: FAILED (rc 1)" in md and "training.prepare" in md  # the log names the fix
