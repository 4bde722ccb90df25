"""The Python half of bench/gpu_check.sh, the GPU acceptance run (run that; these are its steps):

    python -m bench.gpu_check prepare DIR              # optional offline bundle: wheels, GPT-2 BPE Shakespeare,
                                                       #       the quickstart models' exports
    python -m bench.gpu_check env OUT.json [--data DIR] [--dry-run]   # versions, GPU, DeepSpeed, data
    python -m bench.gpu_check guard OUT.json [--dry-run]              # the kernels' first-use checks
    python -m bench.gpu_check launch OUT.json [--dry-run]             # huge batch x heads grids, a second GPU
    python -m bench.gpu_check report RAW_DIR OUT_DIR [--mode M] [--elapsed S]  # gpu_check.json + .md

`prepare` is for air-gapped GPU machines, whose CUDA PyTorch image may lack what the run needs: run it where
there is network (or a pip cache), then carry the folder (default .gpu_check/, ignored by git) beside the
code. It holds wheels at the versions of this environment (DeepSpeed, the server and the `openai` client and
their requirements that such an image may lack; pydantic-core and jiter as cp312 manylinux wheels), the
bundled Shakespeare prepared with the GPT-2 tokenizer, and the exports of the quickstart models
(out/shakespeare_mdlm, out/shakespeare_ar, made by `bash launch.sh`) for the serving load steps. It fails
when the bundle outgrows CARRY_LIMIT_MB (code included).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

if __package__ in (None, ""):  # run as a script: find the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
# what DeepSpeed needs beyond a CUDA PyTorch image (one that has torch, numpy, packaging, psutil,
# py-cpuinfo, tqdm, einops, msgpack, ninja, typing-extensions; typing-extensions travels too, for pydantic)
PURE_WHEELS = ("deepspeed", "hjson", "pydantic", "annotated-types", "typing-inspection", "typing-extensions",
               # the server (inference/serve.py) and the load benchmark's `openai` client; an image's anyio
               # may be older than openai needs, so it travels too
               "fastapi", "starlette", "uvicorn", "opentelemetry-api", "openai", "httpx2", "httpcore2", "sniffio",
               "truststore", "anyio")
BINARY_WHEELS = ("pydantic-core", "jiter")  # cp312 manylinux x86_64
# the quickstart models the serving steps load: MDLM and AR
SERVING_MODELS = {"shakespeare_mdlm": "bash launch.sh",
                  "shakespeare_ar": "CONFIG=training/configs/shakespeare_ar.json OUT_DIR=out/shakespeare_ar bash launch.sh"}
CARRY_LIMIT_MB = 64  # MiB: the bundle and the code together stay below this (one small copy to carry)
STEP_TITLES = {
    "env": "environment", "gpu-tests": "GPU-only tests + first-use check tests", "guard": "first-use kernel checks",
    "multi-gpu": "multi-GPU DeepSpeed training and resume on fewer GPUs",
    "launch": "kernel launches: batch x heads > 65,535, a second GPU",
    "kernel-compile": "kernels compiled for sm_80 / sm_90: no spills, shared memory within limits",
    "attention": "attention benchmark", "masking": "masking benchmark", "training": "GPT-2 124M training",
    "decoding": "decoding benchmark", "serving": "server load, MDLM quickstart model",
    "serving-ar": "server load, AR quickstart model", "kernel-tests": "whole kernel test files",
}


# ------------------------------------------------------------------------------------------- prepare
def prepare(out: Path) -> int:
    wheels, data = out / "wheels", out / "data" / "shakespeare"
    wheels.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    for name in PURE_WHEELS + BINARY_WHEELS:
        version = importlib.metadata.version(name)
        if list(wheels.glob(f"{name.replace('-', '_')}-{version}-*.whl")):
            continue
        if name in BINARY_WHEELS:
            cmd = pip + ["download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                         "--implementation", "cp", "--platform", "manylinux_2_17_x86_64",
                         "--platform", "manylinux2014_x86_64", "-d", str(wheels), f"{name}=={version}"]
        else:  # deepspeed is an sdist on PyPI: build its (pure-Python, no ops) wheel with this torch
            cmd = pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), f"{name}=={version}"]
        print("$", " ".join(cmd), flush=True)
        if subprocess.run(cmd).returncode != 0:
            print(f"prepare: could not get the wheel of {name}=={version}", file=sys.stderr)
            return 1
    if not (data / "meta.json").is_file():
        cmd = [sys.executable, "-m", "training.prepare", "--source", "shakespeare", "--tokenizer", "gpt2", "--out", str(data)]
        print("$", " ".join(cmd), flush=True)
        if subprocess.run(cmd, cwd=REPO).returncode != 0:
            return 1
    for name, how in SERVING_MODELS.items():
        source, target = REPO / "out" / name / "export", out / "models" / name
        if (target / "model.safetensors").is_file():
            continue
        if not (source / "model.safetensors").is_file():
            print(f"prepare: no {source} to carry for the serving step (make it with `{how}`); the step "
                  f"will fail on the GPU machine without it", file=sys.stderr)
            continue
        shutil.copytree(source, target)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2 ** 20
    print(f"prepare: {out} holds {size:.1f} MiB (the bundle's limit is {CARRY_LIMIT_MB} MiB with the code):")
    for f in sorted(out.rglob("*")):
        if f.is_file():
            print(f"  {f.relative_to(out)}  {f.stat().st_size / 2 ** 20:.2f} MiB")
    print(f"on the GPU machine: bash bench/gpu_check.sh OUT_DIR   (with {out} carried beside the code)")
    return 0 if size < CARRY_LIMIT_MB - 8 else 1


# ------------------------------------------------------------------------------------------- env
def _version(name: str):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(out: Path, data_dir: str, dry_run: bool) -> int:
    info = {"dry_run": dry_run, "python": sys.version.split()[0], "executable": sys.executable,
            "platform": platform.platform(), "cpus": os.cpu_count(), "pythonpath": os.environ.get("PYTHONPATH", ""),
            "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1", "problems": []}
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    info["git_commit"] = commit.stdout.strip() or None
    import torch
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    for name in ("triton", "transformers", "deepspeed", "pydantic", "numpy", "safetensors", "pytest", "pytest-xdist"):
        info[name] = _version(name)
    if info["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_count=torch.cuda.device_count(), capability=f"{props.major}.{props.minor}",
                    gpu_memory_gib=round(props.total_memory / 2 ** 30, 1), multiprocessors=props.multi_processor_count,
                    bf16_native=torch.cuda.is_bf16_supported(including_emulation=False))
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True)
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()[:300]
    elif not dry_run:
        info["problems"].append("no CUDA GPU visible to torch: nothing but --dry-run can run here")
    try:
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if info["cuda_available"] else "cpu")
        import deepspeed
        info["deepspeed_import"] = f"ok {deepspeed.__version__} from {Path(deepspeed.__file__).parent}"
    except Exception as exc:  # noqa: BLE001 - report it, the training step will fail on it
        info["deepspeed_import"] = f"FAILED: {type(exc).__name__}: {exc}"
        info["problems"].append("DeepSpeed does not import (carry its wheels: bash bench/gpu_check.sh --prepare): "
                                "the training step will fail")
    meta = Path(data_dir) / "meta.json"
    if meta.is_file():
        m = json.loads(meta.read_text())
        info["data"] = {"dir": data_dir, "tokenizer": m.get("tokenizer"), "train_tokens": m.get("train_tokens"),
                        "val_tokens": m.get("val_tokens")}
    else:
        info["data"] = {"dir": data_dir, "missing": True}
        info["problems"].append(f"no prepared data in {data_dir} (bash bench/gpu_check.sh --prepare makes it): "
                                f"the training step will fail")
    out.write_text(json.dumps(info, indent=1))
    for k, v in info.items():
        print(f"{k}: {v}")
    return 1 if (not dry_run and not info["cuda_available"]) else 0


# ------------------------------------------------------------------------------------------- guard
def guard(out: Path, dry_run: bool) -> int:
    """Run impl="auto" once per case, as a model would, and record every first-use check's verdict."""
    import warnings

    import torch

    import kernels.attention as attn
    import kernels.masking as masking
    from kernels.attention import AttentionMask, attention
    from kernels.masking import apply_diffusion_mask

    if dry_run:  # the interpreter stands in for the GPU (as in tests/test_kernel_guard.py)
        attn._kernel_device = lambda q: True
        masking._kernel_device = lambda x0: True
        device, plan = "cpu", [(torch.float32, 32)]
    elif torch.cuda.is_available():
        device = "cuda"
        plan = [(torch.bfloat16, 64), (torch.bfloat16, 128), (torch.float16, 64), (torch.float32, 64)]
    else:
        print("guard: no CUDA GPU", file=sys.stderr)
        return 1
    masks = [AttentionMask("causal"), AttentionMask("bidirectional"), AttentionMask("block_causal", block_length=16),
             AttentionMask("block_diffusion", block_length=16)]
    rows, t0 = [], time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for dtype, head_dim in plan:
            for mask in masks:
                q = torch.randn(1, 2, 64, head_dim, device=device, dtype=dtype)
                t = time.perf_counter()
                attention(q, q, q, mask, impl="auto")
                rows.append({"what": "attention", "dtype": str(dtype).replace("torch.", ""), "head_dim": head_dim,
                             "mask": mask.kind, "seconds": round(time.perf_counter() - t, 2)})
        x0 = torch.randint(0, 100, (2, 64), device=device)
        apply_diffusion_mask(x0, torch.rand(2, device=device), torch.ones(2, device=device), 100, 0, impl="auto")
    checks = [{"case": attn._describe(c.key), "ok": c.ok, "detail": c.detail} for c in attn.kernel_checks()]
    checks += [{"case": f"diffusion masking of {str(c.key[1]).replace('torch.', '')} ids on {c.key[0]}", "ok": c.ok,
                "detail": c.detail} for c in masking.masking_checks()]
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)", "checks": checks,
              "calls": rows, "warnings": [str(w.message) for w in caught if "diffusionGPT" in str(w.message)],
              "seconds": round(time.perf_counter() - t0, 1)}
    out.write_text(json.dumps(result, indent=1))
    for c in checks:
        print(("ok      " if c["ok"] else "FAILED  ") + c["case"] + (f": {c['detail']}" if c["detail"] else ""))
    for w in result["warnings"]:
        print("WARNING:", w)
    return 0 if all(c["ok"] for c in checks) and checks else 1


# ------------------------------------------------------------------------------------------- launch
SAMPLING_FIXTURE = REPO / "tests" / "fixtures" / "pre_restructure" / "export"  # a tiny MDLM export the tests keep


def _worst_excess(pairs, atol: float, rtol: float):
    """(name, max |got - want|) of the pair furthest over atol + rtol |want|, or None when all are within."""
    import torch
    worst = None
    for name, got, want in pairs:
        got, want = got.detach().double().cpu(), want.detach().double().cpu()
        if not torch.isfinite(got).all():
            return name, float("nan")
        excess = float(((got - want).abs() - atol - rtol * want.abs()).max())
        if excess > 0 and (worst is None or excess > worst[0]):
            worst = (excess, name, float((got - want).abs().max()))
    return None if worst is None else worst[1:]


def _in_fresh_thread(fn):
    """fn() in a new thread, whose current CUDA device is the default (cuda:0), like the server's scheduler."""
    import threading
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            box["error"] = exc
    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def launch_checks(out: Path, dry_run: bool) -> int:
    """What the interpreter cannot show about how the kernels are launched (kernels/launch.py):
    - batch x heads over 65,535 (CUDA's limit on grid axes 1 and 2; the lm-eval backend scores 64 requests
      x 65 rows x 16 heads at once): attention forward + backward against the fp64 reference;
    - a second GPU: the first-use checks of both kernels on cuda:1 and the model's logits on cuda:1 computed
      in a fresh thread (its current device is cuda:0) against the same weights on cuda:0, within a stated
      tolerance; then `inference.sample --device cuda:1` against cuda:0, greedy: the tokens are recorded,
      equal unless a near-tie flipped (autotuned tiles may differ per GPU). Skipped with one GPU.
    A dry run does both on CPU in the interpreter, with a small batch (plumbing only)."""
    import contextlib
    import io

    import torch

    import kernels.attention as attn
    import kernels.masking as masking
    from kernels.attention import AttentionMask, attention_reference, flash_attention

    if not dry_run and not torch.cuda.is_available():
        print("launch: no CUDA GPU", file=sys.stderr)
        return 1
    checks, t0 = [], time.perf_counter()

    def record(name, ok, detail=""):
        checks.append({"check": name, "ok": ok, "detail": detail})
        print(("ok      " if ok else "skipped " if ok is None else "FAILED  ") + name + (f": {detail}" if detail else ""),
              flush=True)

    # 1. batch x heads past 65,535 programs
    device = "cpu" if dry_run else "cuda"
    B, H, T, D = (3, 2, 24, 16) if dry_run else (64 * 65, 16, 24, 32)
    dtype, (atol, rtol) = (torch.float32, (2e-5, 1e-4)) if dry_run else (torch.float16, (5e-3, 1e-2))
    name = f"attention fwd+bwd with B x H = {B} x {H} = {B * H:,} (T {T}, d {D}, {str(dtype)[6:]}, causal, padded)"
    try:
        gen = torch.Generator().manual_seed(0)
        q, k, v, do = (torch.randn(B, H, T, D, generator=gen).to(device, dtype) for _ in range(4))
        mask = AttentionMask("causal", key_lengths=torch.randint(1, T + 1, (B,), generator=gen).to(device))
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        got = flash_attention(*leaves, mask)
        got.backward(do)
        ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
        want = attention_reference(*ref_leaves, mask)
        want.backward(do.double())
        worst = _worst_excess([("output", got, want)] + [(g, a.grad, b.grad) for g, a, b in
                                                         zip(("dq", "dk", "dv"), leaves, ref_leaves)], atol, rtol)
        record(name, worst is None, "" if worst is None else
               f"{worst[0]} off by up to {worst[1]:.3g} (tolerance {atol:g} + {rtol:g} x |reference|)")
        del q, k, v, do, leaves, ref_leaves, got, want
    except Exception as exc:  # noqa: BLE001 - recorded
        record(name, False, f"raised {type(exc).__name__}: {str(exc)[:300]}")

    # 2. the second GPU
    if not dry_run and torch.cuda.device_count() < 2:
        record("kernels and sampling on cuda:1 against cuda:0", None,
               f"{torch.cuda.device_count()} GPU here: needs two")
    else:
        first, second = ("cpu", "cpu") if dry_run else ("cuda:0", "cuda:1")
        try:
            key = (second, torch.float32, "causal", 32, True, False, False)
            verdict = _in_fresh_thread(lambda: attn.check_kernel(key))
            record(f"attention first-use check on {second}, from a fresh thread", verdict.ok, verdict.detail)
            verdict = _in_fresh_thread(lambda: masking.check_masking_kernel(second))
            record(f"masking first-use check on {second}, from a fresh thread", verdict.ok, verdict.detail)

            from inference.loading import load_model
            models = [load_model(str(SAMPLING_FIXTURE), device=d, attn_impl="triton", log=lambda m: None).model
                      for d in (first, second)]
            idx = torch.randint(0, models[0].config.vocab_size, (4, models[0].config.block_size),
                                generator=torch.Generator().manual_seed(1))
            with torch.inference_mode():
                want = models[0](idx.to(first))
                got = _in_fresh_thread(lambda: _inference(models[1], idx.to(second)))
            # fp32, exact IEEE dots on both: the same kernels, up to the tile the autotuner picked on each GPU
            worst = _worst_excess([("logits", got, want)], 1e-4, 1e-4)
            record(f"model logits on {second} (fresh thread) against {first}, fp32", worst is None,
                   "" if worst is None else f"{worst[0]} off by up to {worst[1]:.3g} (tolerance 1e-4 + 1e-4 x |ref|)")

            from inference.sample import parse_args, run
            tokens = []
            for d in (first, second):
                with contextlib.redirect_stdout(io.StringIO()):
                    done = run(parse_args(["--ckpt", str(SAMPLING_FIXTURE), "--device", d, "--dtype", "float32",
                                           "--attn_impl", "triton", "--start", "The ", "--num_samples", "2",
                                           "--max_new_tokens", "16", "--temperature", "0", "--no_progress"]))
                tokens.append([c.token_ids for c in done])
            same = tokens[0] == tokens[1]
            record(f"inference.sample --device {second} against {first} (greedy, 2 x 16 tokens)", True,
                   "identical tokens" if same else f"tokens differ (a near-tie flipped; the logits check above is "
                   f"the criterion): {tokens[0]} vs {tokens[1]}")
        except Exception as exc:  # noqa: BLE001 - recorded
            record(f"kernels and sampling on {second}", False, f"raised {type(exc).__name__}: {str(exc)[:300]}")

    # 3. what the autotune pruner keeps on this GPU compiles without register spills
    name = "autotuned attention configs compile without register spills on this GPU"
    if dry_run:
        record(name, None, "the interpreter does not autotune")
    else:
        try:
            kept = _pruned_configs_and_spills(attn)
            spilling = [f"{kernel} {cfg}: {n:g} B" for kernel, configs in kept for cfg, n in configs if n]
            record(name, not spilling, f"{sum(len(c) for _, c in kept)} configs kept by {len(kept)} prunings" +
                   (f"; spilling (every candidate spilled): {', '.join(spilling)}" if spilling else ""))
        except Exception as exc:  # noqa: BLE001 - recorded
            record(name, False, f"raised {type(exc).__name__}: {str(exc)[:300]}")

    result = {"device": "cpu (interpreter)" if dry_run else torch.cuda.get_device_name(),
              "gpus": 0 if dry_run else torch.cuda.device_count(), "checks": checks,
              "seconds": round(time.perf_counter() - t0, 1)}
    out.write_text(json.dumps(result, indent=1))
    return 0 if all(c["ok"] is not False for c in checks) else 1


def _pruned_configs_and_spills(attn) -> list:
    """Tune the three attention kernels for new shapes (bf16 d128, fp16 d64, fp32 d64, block-causal, padded)
    and return, per pruning, [(config, spilled bytes on this GPU)] of what the pruner kept."""
    import torch
    seen, original = [], {}
    for name in ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"):
        tuner = getattr(attn, name)
        prune = original[name] = tuner.early_config_prune

        def recording(configs, named_args, _prune=prune, _name=name, _fn=tuner.fn, **kwargs):
            kept = _prune(configs, named_args, **kwargs)
            seen.append((_name, [(str(c), attn._spilled_bytes(_fn, c, named_args, kwargs)) for c in kept]))
            return kept
        tuner.early_config_prune = recording
    try:
        for dtype, head_dim in ((torch.bfloat16, 128), (torch.float16, 64), (torch.float32, 64)):
            gen = torch.Generator().manual_seed(2)
            q, k, v, do = (torch.randn(2, 4, 300, head_dim, generator=gen).to("cuda", dtype) for _ in range(4))
            mask = attn.AttentionMask("block_causal", block_length=16, key_lengths=torch.tensor([300, 211], device="cuda"))
            leaves = [t.requires_grad_() for t in (q, k, v)]
            attn.flash_attention(*leaves, mask).backward(do)
    finally:
        for name, prune in original.items():
            getattr(attn, name).early_config_prune = prune
    return seen


def _inference(model, idx):
    import torch
    with torch.inference_mode():
        return model(idx)


# ------------------------------------------------------------------------------------------- report
def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _junit(path: Path):
    if not path.is_file():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    out = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "failed": [], "time_s": 0.0}
    for s in suites:
        for k in ("tests", "failures", "errors", "skipped"):
            out[k] += int(s.get(k, 0))
        out["time_s"] += float(s.get("time", 0))
        for case in s.iter("testcase"):
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            if bad is not None:
                out["failed"].append(f"{case.get('classname')}::{case.get('name')}: "
                                     f"{(bad.get('message') or '')[:200]}")
    out["passed"] = out["tests"] - out["failures"] - out["errors"] - out["skipped"]
    return out


def _fmt(x, spec=".3g"):
    return "n/a" if x is None else format(x, spec)


def report(raw: Path, out_dir: Path, mode: str, elapsed: float) -> int:
    steps = []
    if (raw / "steps.tsv").is_file():
        for line in (raw / "steps.tsv").read_text().splitlines():
            name, rc, secs, limit, cmd = (line.split("\t") + [""] * 5)[:5]
            status = ("skipped (out of time)" if rc == "skipped" else "ok" if rc == "0" else
                      "TIMED OUT" if rc in ("124", "137") else f"FAILED (rc {rc})")
            log = raw / f"{name}.log"
            tail = log.read_text(errors="replace").splitlines()[-25:] if log.is_file() and rc not in ("0", "skipped") else []
            steps.append({"step": name, "status": status, "rc": rc, "seconds": int(secs or 0), "limit_s": int(limit or 0),
                          "command": cmd, "log_tail": tail})
    result = {"mode": mode, "elapsed_s": elapsed, "written": time.strftime("%Y-%m-%d %H:%M:%S"), "steps": steps,
              "env": _load(raw / "env.json"), "wheels": (raw / "wheels.txt").read_text().split() if (raw / "wheels.txt").is_file() else [],
              "gpu_tests": _junit(raw / "gpu-tests.xml"), "guard": _load(raw / "guard.json"),
              "multi_gpu": _load(raw / "multi-gpu.json"),
              "launch": _load(raw / "launch.json"), "kernel_compile": _load(raw / "kernel-compile.json"),
              "attention": _load(raw / "attention.json"), "masking": _load(raw / "masking.json"),
              "training": _load(raw / "training.json"), "decoding": _load(raw / "decoding.json"),
              "serving": [x for x in (_load(raw / "serving.json"), _load(raw / "serving-ar.json")) if x],
              "kernel_tests": _junit(raw / "kernel-tests.xml")}
    (out_dir / "gpu_check.json").write_text(json.dumps(result, indent=1))
    (out_dir / "gpu_check.md").write_text(markdown(result))
    return 0


def markdown(r: dict) -> str:
    env = r["env"] or {}
    md = [f"# diffusionGPT GPU check ({r['mode']})", ""]
    md.append(f"Written {r['written']}, {r['elapsed_s']:.0f} s into the run. "
              f"GPU: {env.get('gpu', 'none')} ({env.get('gpu_memory_gib', '?')} GiB, sm {env.get('capability', '?')}); "
              f"Python {env.get('python')}, torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), "
              f"triton {env.get('triton')}, transformers {env.get('transformers')}, deepspeed {env.get('deepspeed')}; "
              f"commit {env.get('git_commit')}.")
    if r["wheels"]:
        md.append(f"Carried wheels installed into a temp path: {', '.join(r['wheels'])}.")
    for p in env.get("problems", []):
        md.append(f"- **problem:** {p}")
    md += ["", "| step | what | status | seconds (limit) |", "|---|---|---|---|"]
    for s in r["steps"]:
        md.append(f"| {s['step']} | {STEP_TITLES.get(s['step'], '')} | {s['status']} | {s['seconds']} ({s['limit_s']}) |")
    for name in ("gpu_tests", "kernel_tests"):
        t = r[name]
        if t:
            md += ["", f"## {'GPU-only tests' if name == 'gpu_tests' else 'Kernel test files'}", "",
                   f"{t['passed']} passed, {t['failures'] + t['errors']} failed, {t['skipped']} skipped "
                   f"({t['time_s']:.0f} s)."]
            md += [f"- FAILED {f}" for f in t["failed"][:30]]
    g = r["guard"]
    if g:
        md += ["", "## First-use kernel checks", "", f"{g['device']}, {g['seconds']} s:", ""]
        md += [f"- {'ok' if c['ok'] else '**FAILED**'}: {c['case']}" + (f": {c['detail']}" if c["detail"] else "")
               for c in g["checks"]]
    mg = r.get("multi_gpu")
    if mg:
        md += ["", f"## Multi-GPU training ({mg['ranks']} rank(s), {mg['dtype']}, {mg['gpus']} GPU(s) visible)", ""]
        md += [f"- {'ok' if c['ok'] else '**FAILED**'}: {name}: "
               + ", ".join(f"{k} {v}" for k, v in c.items() if k != "ok") for name, c in mg["checks"].items()]
        if mg.get("not_run"):
            md.append(f"- not run: {mg['not_run']}")
    la = r.get("launch")
    if la:
        md += ["", "## Kernel launches", "", f"{la['device']}, {la['gpus']} GPU(s), {la['seconds']} s:", ""]
        md += [f"- {'ok' if c['ok'] else 'skipped' if c['ok'] is None else '**FAILED**'}: {c['check']}"
               + (f": {c['detail']}" if c["detail"] else "") for c in la["checks"]]
    kc = r.get("kernel_compile")
    if kc:
        bad = [c for c in kc["cases"] if not c["ok"]]
        md += ["", "## Kernels compiled for " + ", ".join(f"sm_{a}" for a in kc["archs"]), "",
               f"{len(kc['cases']) - len(bad)} of {len(kc['cases'])} cases keep a config that compiles without "
               f"register spills within the shared memory limit ({'the representative subset' if kc['subset'] else 'every case'}, "
               f"{kc['seconds']:.0f} s)."]
        md += [f"- **FAILED** {c['name']}: " + "; ".join(f"{cfg}: {why}" for cfg, why in c["dropped"])
               for c in bad[:40]]
    a = r["attention"]
    if a and a.get("rows"):
        md += ["", f"## Attention ({a['device']}, {a['dtype']}, {a['tokens']} tokens per batch, model dim "
                   f"{a['model_dim']}{'' if a.get('complete') else '; INCOMPLETE: stopped by its time budget'})", "",
               "TFLOP/s over visible pairs; x = baseline ms / Triton ms (> 1: Triton faster).", "",
               "| T | d | mask | mode | Triton TFLOP/s | SDPA flash TFLOP/s | x vs SDPA | Flex TFLOP/s | x vs Flex |",
               "|---|---|---|---|---|---|---|---|---|"]
        for row in a["rows"]:
            mask = row["mask"] + (f" b={row['block_length']}" if row["block_length"] else "")
            md.append(f"| {row['T']} | {row['head_dim']} | {mask} | {row['mode']} | {_fmt(row.get('triton_tflops'))} | "
                      f"{_fmt(row.get('sdpa_tflops'))} | {_fmt(row.get('triton_vs_sdpa'), '.2f')} | "
                      f"{_fmt(row.get('flex_tflops'))} | {_fmt(row.get('triton_vs_flex'), '.2f')} |")
    m = r["masking"]
    if m and m.get("rows"):
        md += ["", f"## Masking kernel ({m['device']})", "", "| B x T | Triton GB/s | PyTorch GB/s | x faster |",
               "|---|---|---|---|"]
        md += [f"| {row['B']} x {row['T']} | {row['triton_gb_s']:.1f} | {row['torch_gb_s']:.1f} | "
               f"{row['triton_vs_torch']:.2f} |" for row in m["rows"]]
    t = r["training"]
    if t and t.get("results"):
        c = t["config"]
        md += ["", f"## Training ({t.get('device')}: {c['model']['n_layer']}L/{c['model']['n_embd']}d, block "
                   f"{c['model']['block_size']}, batch {c['batch_size']}, {c['dtype']}, compile={c['compile']})", "",
               "| variant | tokens/s | MFU | vs first | last loss |", "|---|---|---|---|---|"]
        md += [f"| {name} | {v['tokens_per_s']:,.0f} | {v['mfu']:.1%} | {v['ratio_to_first']:.3f} | {v['last_loss']:.4f} |"
               for name, v in t["results"].items()]
    d = r["decoding"]
    if d and d.get("rows"):
        md += ["", "## Decoding (random-init models: speed only)", "", "| rule | tokens/s | model calls per token |",
               "|---|---|---|"]
        md += [f"| {row['name']} | {row['tokens_per_s']:,.0f} | {row['nfe_per_token']:.3f} |" for row in d["rows"]]
    for load in r.get("serving") or []:
        from bench.serve_load import markdown_table  # here: the report must not depend on the client's imports
        md += ["", f"## Server load ({load['model']}: {load['objective']}, strategy {load['strategy']}, "
                   f"{load['requests']} requests per level, the official openai client over loopback)", "",
               *markdown_table(load["levels"])]
    bad = [s for s in r["steps"] if s["log_tail"]]
    if bad:
        md += ["", "## Logs of failed steps (last lines)"]
        for s in bad:
            md += ["", f"### {s['step']}: {s['status']}", "", f"`{s['command']}`", "", "```", *s["log_tail"], "```"]
    return "\n".join(md) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("dir", nargs="?", default=".gpu_check")
    e = sub.add_parser("env")
    e.add_argument("out")
    e.add_argument("--data", default=".gpu_check/data/shakespeare")
    e.add_argument("--dry-run", action="store_true")
    g = sub.add_parser("guard")
    g.add_argument("out")
    g.add_argument("--dry-run", action="store_true")
    la = sub.add_parser("launch")
    la.add_argument("out")
    la.add_argument("--dry-run", action="store_true")
    r = sub.add_parser("report")
    r.add_argument("raw")
    r.add_argument("out_dir")
    r.add_argument("--mode", default="gpu")
    r.add_argument("--elapsed", type=float, default=0.0)
    args = ap.parse_args(argv)
    if args.cmd == "prepare":
        return prepare(Path(args.dir))
    if args.cmd == "env":
        return environment(Path(args.out), args.data, args.dry_run)
    if args.cmd == "guard":
        return guard(Path(args.out), args.dry_run)
    if args.cmd == "launch":
        return launch_checks(Path(args.out), args.dry_run)
    return report(Path(args.raw), Path(args.out_dir), args.mode, args.elapsed)


if __name__ == "__main__":
    sys.exit(main())
