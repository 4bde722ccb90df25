"""training/: DeepSpeed pretraining on CPU through the real launcher, checkpoints, export, config errors.

The multi-process tests (@slow) start `deepspeed --num_gpus 2` with DS_ACCELERATOR=cpu and
OMP_NUM_THREADS=1, exactly as a CPU user does. Each ZeRO stage trains the same tiny run once
(conftest.two_rank_run, shared with test_multinode.py: 20 steps, checkpoints at 10 and 20) and resumes it
once from step 10; the tests then read those runs' metrics.jsonl, checkpoints and exports. The refusals of
bad input call training/pretrain.py in this process (tests/in_process.py).

Tolerances: ZeRO stages reduce gradients in different orders, so their losses agree to ~3e-7 here; the
tests allow 1e-5. A resumed run reproduces the uninterrupted one exactly (CPU, fp32).

The FSDP engine (--engine=fsdp, training/engines/fsdp_engine.py) runs through `torchrun --nproc_per_node 2` on
gloo. Its losses match a DeepSpeed ZeRO-0 run of the same config within the same 1e-5 (~2e-7 seen):
both are fp32 and do the same maths, but FSDP reduce-scatters and shards gradients, AdamW and the norm,
so floating-point sums run in another order; resume and export are checked exactly as for DeepSpeed.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from in_process import pretrain_cli
from training.checkpointing import layout as ckpt
from training.checkpointing.safe_load import safe_torch_load
from training.config import load_config
from training.engines.ds_config import ConfigConflict, load_ds_json, resolve
from common.ports import free_port
from training.metrics import read_records

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
TINY_CONFIG = REPO / "training/configs/tiny_test.json"
STAGES = ["zero0", "zero1", "zero2", "zero3", "zero3_offload"]
RESUMED_STAGES = ["zero0", "zero1", "zero2", "zero3"]
SHA256_STAGES = ["zero1"]  # these train with --checkpoint_hash=sha256, the others with the default (sizes)
STAGE_TOLERANCE = 1e-5  # nats/token, between ZeRO stages
FSDP_TOLERANCE = 1e-5  # nats/token, FSDP vs ZeRO-0: fp32 both, reductions in another order
TEARDOWN_ABORT = "terminate called without an active exception"


# ----------------------------------------------------------------------------- helpers
def git_head() -> str | None:
    """This checkout's commit, None when the tests run outside a git checkout."""
    proc = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 and (REPO / ".git").exists() else None


def env_for_cpu_ranks() -> dict:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    return env  # TORCH_EXTENSIONS_DIR, the compiled shm op's cache: conftest.py


def records(out_dir, kind=None) -> list[dict]:
    return read_records(out_dir, kind)  # skips a torn last line, as every reader of metrics.jsonl does


def train_losses(out_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(out_dir, "train")}


def check_finished(proc: subprocess.CompletedProcess, out_dir) -> None:
    """A run succeeded when it exited 0, or, only if it aborted in teardown with the one known message,
    when it still wrote its final "done" record and a verified checkpoint."""
    output = (proc.stdout or "") + (proc.stderr or "")
    done = records(out_dir)[-1:] and records(out_dir)[-1]["kind"] == "done"
    if proc.returncode == 0:
        assert done, f"exit 0 but no 'done' record in {out_dir}/metrics.jsonl\n{output[-4000:]}"
        return
    found = ckpt.find_latest_good(out_dir)
    assert TEARDOWN_ABORT in output and done and found is not None, \
        f"training failed (exit {proc.returncode})\n{output[-6000:]}"


def replayed_val_loss(model, info: dict, data_dir) -> float:
    """The final evaluation of a run, redone on its export: the same val batches and seeds as
    training/pretrain.py's evaluate (2 ranks), one process."""
    from models.diffusion import ObjectiveConfig, compute_loss
    from training.data import TokenDataset
    from training.distributed import mix_seed

    cfg = info["train_config"]
    objective = ObjectiveConfig(**info["objective"])
    val = TokenDataset(data_dir, "val")
    num_batches = math.ceil(cfg["eval_iters"] / 2) * 2
    with torch.no_grad():
        losses = [compute_loss(model, x, y, objective, info["mask_id"], mix_seed(cfg["seed"], 1, b)).item()
                  for b, (x, y) in enumerate(val.val_batches(cfg["batch_size"], cfg["model"]["block_size"], num_batches))]
    return sum(losses) / len(losses)


def deepspeed_run(out_dir, ds_config, *extra, nproc=2, timeout=300) -> subprocess.CompletedProcess:
    cmd = [DEEPSPEED, "--num_gpus", str(nproc), "--master_port", str(free_port()), "training/pretrain.py",
           "--config", str(TINY_CONFIG), "--deepspeed_config", str(ds_config), "--out_dir", str(out_dir), *extra]
    return subprocess.run(cmd, cwd=REPO, env=env_for_cpu_ranks(), capture_output=True, text=True, timeout=timeout)


def torchrun_fsdp(out_dir, *extra, nproc=2, timeout=300) -> subprocess.CompletedProcess:
    """The FSDP engine as a user launches it: torchrun --nproc_per_node 2 ... --engine=fsdp."""
    cmd = [TORCHRUN, "--nproc_per_node", str(nproc), "--master_port", str(free_port()), "training/pretrain.py",
           "--config", str(TINY_CONFIG), "--engine=fsdp", "--out_dir", str(out_dir), *extra]
    return subprocess.run(cmd, cwd=REPO, env=env_for_cpu_ranks(), capture_output=True, text=True, timeout=timeout)


def python_run(*args, timeout=180) -> subprocess.CompletedProcess:
    """One process, no launcher: `python training/pretrain.py ...`."""
    return subprocess.run([PY, "training/pretrain.py", *args], cwd=REPO, env=env_for_cpu_ranks(),
                          capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def stage_runs(two_rank_run, tiny_data, ds_configs, tmp_path_factory) -> dict[str, dict]:
    """Every stage: a 20-step run (2 ranks; conftest.two_rank_run), then a run resumed from its step-10
    checkpoint."""
    root = tmp_path_factory.mktemp("runs")
    runs = {}
    for stage in STAGES:
        hashing = ["--checkpoint_hash=sha256"] if stage in SHA256_STAGES else []  # the resumed run inherits it
        runs[stage] = dict(two_rank_run(stage, *hashing))
        if stage in RESUMED_STAGES:
            resumed = root / f"{stage}_resumed"
            (resumed / "ckpt").mkdir(parents=True)
            shutil.copytree(runs[stage]["full"] / "ckpt" / "step_000010", resumed / "ckpt" / "step_000010")
            (resumed / "ckpt" / "latest").write_text("step_000010")
            proc = deepspeed_run(resumed, ds_configs[stage], "--resume", "--data_dir", str(tiny_data))
            check_finished(proc, resumed)
            runs[stage]["resumed"] = resumed
            runs[stage]["resumed_log"] = proc.stdout + proc.stderr
    return runs


# ----------------------------------------------------------------------------- 2-rank runs, every stage
@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_training_decreases_loss(stage_runs, stage):
    out = stage_runs[stage]["full"]
    losses = train_losses(out)
    assert sorted(losses) == list(range(1, 21))
    first, last = sum(losses[s] for s in range(1, 4)) / 3, sum(losses[s] for s in range(18, 21)) / 3
    assert last < first - 0.3, losses
    evals = [r["val_loss"] for r in records(out, "eval")]
    assert len(evals) == 3 and evals[-1] < evals[0]  # steps 0, 10, 20
    config = records(out, "config")[0]
    assert config["world_size"] == 2 and config["zero_stage"] == (3 if "zero3" in stage else int(stage[-1]))
    # the run can be traced to its code: the commit of this checkout and the library versions
    assert config["git_commit"] == git_head() and config["versions"]["torch"] == torch.__version__
    assert all(r["grad_norm"] is not None and r["grad_norm"] > 0 for r in records(out, "train"))


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES[1:])
def test_stages_agree_with_zero0(stage_runs, stage):
    ref, got = train_losses(stage_runs["zero0"]["full"]), train_losses(stage_runs[stage]["full"])
    worst = max(abs(ref[s] - got[s]) for s in ref)
    assert worst < STAGE_TOLERANCE, f"{stage} differs from zero0 by {worst:.2e} nats/token"
    ref_val = [r["val_loss"] for r in records(stage_runs["zero0"]["full"], "eval")]
    got_val = [r["val_loss"] for r in records(stage_runs[stage]["full"], "eval")]
    assert got_val == pytest.approx(ref_val, abs=STAGE_TOLERANCE)


@pytest.mark.slow
@pytest.mark.parametrize("stage", RESUMED_STAGES)
def test_resume_reproduces_losses(stage_runs, stage):
    full, resumed = train_losses(stage_runs[stage]["full"]), train_losses(stage_runs[stage]["resumed"])
    assert sorted(resumed) == list(range(11, 21))
    assert [resumed[s] for s in range(11, 21)] == [full[s] for s in range(11, 21)]  # exact on CPU fp32
    assert records(stage_runs[stage]["resumed"], "resumed")[0]["checkpoint"] == "step_000010"
    full_val = records(stage_runs[stage]["full"], "eval")[-1]["val_loss"]
    assert records(stage_runs[stage]["resumed"], "eval")[-1]["val_loss"] == full_val


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_checkpoint_is_complete_and_marked(stage_runs, stage):
    root = ckpt.ckpt_root(stage_runs[stage]["full"])
    assert (root / "latest").read_text() == "step_000020"
    for tag in ("step_000010", "step_000020"):
        assert ckpt.verify(root / tag) is None
        assert {"rng_rank0.pt", "rng_rank1.pt", "train_config.json", "ds_config.json"} <= {p.name for p in (root / tag).iterdir()}
    saved = json.loads((root / "step_000020" / "train_config.json").read_text())
    cfg, _ = load_config(None, [], base=saved)  # the saved, resolved config loads back as it was
    assert cfg.to_dict() == saved and cfg.model.vocab_size > 0 and cfg.dtype == "fp32"


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero0", *SHA256_STAGES])
def test_a_two_rank_save_records_sha256_only_when_asked(stage_runs, stage):
    """The default manifest holds sizes; with --checkpoint_hash=sha256 the two ranks hash their shares of
    the files and rank 0's manifest holds every file's sha256 (its resume, on rank 0, is
    test_resume_reproduces_losses[zero1])."""
    root = ckpt.ckpt_root(stage_runs[stage]["full"])
    for tag in ("step_000010", "step_000020"):
        files = json.loads((root / tag / ckpt.MANIFEST).read_text())["files"]
        assert {n: e["bytes"] for n, e in files.items()} == {n: (root / tag / n).stat().st_size for n in files}
        expected = {n: hashlib.sha256((root / tag / n).read_bytes()).hexdigest() for n in files}
        assert {n: e["sha256"] for n, e in files.items() if "sha256" in e} == (expected if stage in SHA256_STAGES else {})


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_export_reproduces_the_trained_model(stage_runs, tiny_data, stage):
    """The auto-export at the end of training evaluates to exactly the val NELBO the run logged, and
    the exports of all stages give the same logits."""
    from models.tokenizer import tokenizer_from_meta
    from models.weights import load_consolidated

    out = stage_runs[stage]["full"]
    model, info = load_consolidated(out / "export")
    assert info["step"] == 20 and info["mask_id"] == tokenizer_from_meta(info["tokenizer"]).mask_id
    assert info["objective"]["name"] == "mdlm" and info["train_config"]["max_iters"] == 20
    logged = records(out, "eval")[-1]["val_loss"]
    assert replayed_val_loss(model, info, tiny_data) == pytest.approx(logged, abs=1e-5)

    x = torch.arange(32).view(1, 32) % 60
    ref, _ = load_consolidated(stage_runs["zero0"]["full"] / "export")
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_a_zero0_bf16_export_holds_the_fp32_master_weights(tiny_data, ds_configs, tmp_path):
    """ZeRO-0 in bf16 (the GPU default) trains a bf16 copy of the model; the export must be the fp32
    weights the optimizer keeps, not that copy rounded to 8 bits. Runs on DeepSpeed's CPU accelerator,
    which trains in bf16 the same way (FP16 optimizer wrapper, masters in the optimizer state)."""
    from models.weights import load_consolidated

    out = tmp_path / "bf16"
    check_finished(python_run("--config", str(TINY_CONFIG), "--deepspeed_config", str(ds_configs["zero0"]),
                              "--data_dir", str(tiny_data), "--out_dir", str(out), "--dtype=bf16",
                              "--max_iters=4", "--eval_interval=4", "--log_interval=4"), out)
    saved = safe_torch_load(out / "ckpt" / "step_000004" / "mp_rank_00_model_states.pt")
    decay, no_decay = saved["optimizer"]["fp32_groups"]  # GPT.optimizer_param_groups' order
    model, _ = load_consolidated(out / "export")
    exported = model.state_dict()
    assert torch.equal(exported["transformer.wte.weight"], decay[0])  # the first >= 2-D parameter
    assert torch.equal(exported["transformer.h.0.ln_1.weight"], no_decay[0])  # the first 1-D one
    bf16 = saved["module"]
    for name, weight in exported.items():
        assert weight.dtype == torch.float32
        assert torch.equal(weight.bfloat16(), bf16["gpt." + name]), name  # the copy is these, rounded
    assert any(not torch.equal(w, w.bfloat16().float()) for w in exported.values())  # more bits than bf16


@pytest.mark.slow
def test_export_cli_from_a_tag_dir(stage_runs, tmp_path):
    from models.weights import load_consolidated

    tag_dir = ckpt.ckpt_root(stage_runs["zero3"]["full"]) / "step_000010"
    proc = subprocess.run([PY, "-m", "training.export", "--ckpt", str(tag_dir), "--out", str(tmp_path / "e")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    model, info = load_consolidated(tmp_path / "e")
    assert info["step"] == 10 and info["model"]["vocab_size"] == model.config.vocab_size


@pytest.mark.slow
def test_export_cli_keeps_an_export_of_another_run_unless_overwrite(stage_runs, tmp_path):
    """A run's export (of step 20) is replaced by any checkpoint of that run (as training and inference's
    re-consolidation do); another run's checkpoint is refused, nothing changed, until --overwrite."""
    from models.weights import read_info
    from training import export

    run, other = stage_runs["zero0"]["full"], stage_runs["zero1"]["full"]
    out = tmp_path / "e"
    shutil.copytree(run / "export", out)
    export.main(["--ckpt", str(run / "ckpt" / "step_000010"), "--out", str(out)])  # the same run: allowed
    assert read_info(out)["step"] == 10
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(SystemExit) as refused:
        export.main(["--ckpt", str(other), "--out", str(out)])
    assert re.search(rf"--out {out} holds an export of another run \(.*zero0.*step_000010, step 10\); exporting "
                     rf".*zero1.*step_000020 would replace it.*--out NEW_DIR.*--overwrite", str(refused.value.code))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    export.main(["--ckpt", str(other), "--out", str(out), "--overwrite"])
    assert read_info(out)["train_config"]["out_dir"] == str(other)


def seal_with_sha256(out_dir) -> None:
    """Rewrite a run's manifests as a save with --checkpoint_hash=sha256 writes them (sizes and sha256)."""
    root = ckpt.ckpt_root(out_dir)
    for step, tag in ckpt.list_tags(root):
        ckpt.finalize(root, tag, step, keep=100, sha256=ckpt.sha256_share(root / tag, 0, 1))


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint_hash, damage, said", [
    # same size: only a sha256 manifest sees it
    ("sha256", "one flipped byte", r"mp_rank_00_model_states\.pt does not match its sha256"),
    ("none", "truncated", r"mp_rank_00_model_states\.pt has 100 bytes, the manifest says \d+")])
def test_corrupt_checkpoint_falls_back_to_previous_good(stage_runs, tmp_path, checkpoint_hash, damage, said):
    out = tmp_path / "run"
    shutil.copytree(stage_runs["zero0"]["full"] / "ckpt", out / "ckpt")
    if checkpoint_hash == "sha256":
        seal_with_sha256(out)
    victim = out / "ckpt" / "step_000020" / "mp_rank_00_model_states.pt"
    data = bytearray(victim.read_bytes())
    if damage == "one flipped byte":
        data[len(data) // 2] ^= 0xFF
    else:
        del data[100:]
    victim.write_bytes(bytes(data))
    proc = python_run("--config", str(TINY_CONFIG), "--deepspeed_config", str(REPO / "ds_configs/zero0.json"),
                      "--out_dir", str(out), "--resume", "--eval_only",
                      "--data_dir", json.loads((out / "ckpt/step_000010/data_meta.json").read_text())["data_dir"])
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert re.search(f"WARNING: skipped checkpoint step_000020: {said}", proc.stdout), output[-4000:]
    assert "resumed from" in output and "step_000010" in output
    assert records(out, "resumed")[0]["checkpoint"] == "step_000010"


@pytest.mark.slow
@pytest.mark.parametrize("change, difference, fix", [
    ("--model.pos_emb=learned", "model.pos_emb", ""),
    ("--model.n_layer=3", r"model\.n_layer: checkpoint 2, now 3", r"--model\.n_layer=2.*new --out_dir"),
    ("--objective.name=ar", "objective.name", "")])
def test_resume_with_another_network_names_the_difference_and_the_fix(stage_runs, tmp_path, change, difference, fix):
    """Refused before anything is loaded (in this process: tests/in_process.py), nothing in out_dir changed."""
    out = tmp_path / "run"
    shutil.copytree(stage_runs["zero0"]["full"] / "ckpt", out / "ckpt")
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    data_dir = json.loads((out / "ckpt/step_000010/data_meta.json").read_text())["data_dir"]
    extra = ["--model.attention=causal"] if change == "--objective.name=ar" else []
    proc = pretrain_cli("--config", TINY_CONFIG, "--deepspeed_config", REPO / "ds_configs/zero0.json",
                        "--out_dir", out, "--resume", "--eval_only", "--data_dir", data_dir, change, *extra)
    assert proc.returncode != 0
    assert "another network" in proc.stderr and re.search(difference, proc.stderr), proc.stderr[-3000:]
    assert re.search(fix, proc.stderr, re.S), proc.stderr[-3000:]
    assert {p: p.read_bytes() if p.is_file() else None for p in before} == before  # nothing lost or changed


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_cpu_runs_leave_no_shared_memory_behind(stage_runs, stage):
    """DeepSpeed's CPU all-reduce creates a 66 MB /dev/shm file per rank and never removes it
    (training/shm_buffers.py); without the cleanup each 2-rank run leaves two files named after its port
    (listed as soon as the run ended: conftest.two_rank_run)."""
    assert stage_runs[stage]["shm_left"] == []


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_then_exits(tiny_data, ds_configs, tmp_path):
    out = tmp_path / "run"
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "training/pretrain.py",
           "--config", str(TINY_CONFIG), "--deepspeed_config", str(ds_configs["zero2"]), "--out_dir", str(out),
           "--data_dir", str(tiny_data), "--max_iters=100000", "--checkpoint_interval=0", "--eval_interval=100000"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env_for_cpu_ranks(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and not [r for r in records(out, "train") if r["step"] >= 3]:
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        time.sleep(0.1)
    # what a cluster scheduler does: SIGTERM to the whole job (launcher and ranks)
    os.killpg(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    deadline = time.time() + 60
    while time.time() < deadline:  # the ranks outlive the launcher's top process while they checkpoint
        try:
            os.killpg(proc.pid, 0)
            time.sleep(0.1)
        except ProcessLookupError:
            break
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("ranks still running 60 s after SIGTERM")
    stopped = records(out, "stopped")
    assert stopped, f"no 'stopped' record\n{output[-4000:]}"
    step = stopped[0]["step"]
    found = ckpt.find_latest_good(out)
    assert found is not None and found.step == step and found.tag == stopped[0]["checkpoint"]
    assert max(train_losses(out)) <= step < 100000


@pytest.mark.slow
def test_bd3lm_trains_on_two_ranks_and_exports_its_objective(tiny_data, ds_configs, tmp_path):
    """Block diffusion through the real launcher (ZeRO-2 only: the objective does not touch sharding):
    the loss falls, the export records objective bd3lm, inference loads it as bd3lm, and the export
    reproduces the val NELBO the run logged (exactly as for mdlm above)."""
    from inference.loading import load_model

    out = tmp_path / "bd3lm"
    proc = deepspeed_run(out, ds_configs["zero2"], "--data_dir", str(tiny_data), "--objective=bd3lm",
                         "--model.attention=block_causal", "--model.block_length=8")
    check_finished(proc, out)
    losses = train_losses(out)
    assert sorted(losses) == list(range(1, 21))
    first, last = sum(losses[s] for s in range(1, 4)) / 3, sum(losses[s] for s in range(18, 21)) / 3
    assert last < first - 0.3, losses
    assert records(out, "eval")[-1]["val_ppl_is_bound"] is True
    loaded = load_model(ckpt=str(out), device="cpu", log=lambda *a: None)
    info = loaded.info
    assert loaded.objective == "bd3lm" and info["objective"]["name"] == "bd3lm"
    assert loaded.model.config.attention == "block_causal" and loaded.model.config.block_length == 8
    logged = records(out, "eval")[-1]["val_loss"]
    assert replayed_val_loss(loaded.model, info, tiny_data) == pytest.approx(logged, abs=1e-5)


# ----------------------------------------------------------------------------- the FSDP engine (torchrun)
@pytest.fixture(scope="module")
def fsdp_runs(two_rank_run, tiny_data, tmp_path_factory) -> dict[str, Path]:
    """A 20-step FSDP run (2 ranks), the same run resumed from its step-10 checkpoint, and the DeepSpeed
    ZeRO-0 run of the same config as the reference."""
    root = tmp_path_factory.mktemp("fsdp_runs")
    runs = {"fsdp": root / "fsdp", "resumed": root / "fsdp_resumed"}
    proc = torchrun_fsdp(runs["fsdp"], "--data_dir", str(tiny_data))
    check_finished(proc, runs["fsdp"])
    (runs["resumed"] / "ckpt").mkdir(parents=True)
    shutil.copytree(runs["fsdp"] / "ckpt" / "step_000010", runs["resumed"] / "ckpt" / "step_000010")
    (runs["resumed"] / "ckpt" / "latest").write_text("step_000010")
    # no --engine flag: the engine comes back from the checkpoint's saved config
    cmd = [TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()), "training/pretrain.py",
           "--config", str(TINY_CONFIG), "--out_dir", str(runs["resumed"]), "--resume", "--data_dir", str(tiny_data)]
    proc = subprocess.run(cmd, cwd=REPO, env=env_for_cpu_ranks(), capture_output=True, text=True, timeout=300)
    check_finished(proc, runs["resumed"])
    runs["zero0"] = two_rank_run("zero0")["full"]  # the stage run of test_training_decreases_loss[zero0]
    return runs


@pytest.mark.slow
def test_fsdp_matches_deepspeed_zero0(fsdp_runs):
    ref, got = train_losses(fsdp_runs["zero0"]), train_losses(fsdp_runs["fsdp"])
    assert sorted(got) == list(range(1, 21))
    worst = max(abs(ref[s] - got[s]) for s in ref)
    assert worst < FSDP_TOLERANCE, f"fsdp differs from zero0 by {worst:.2e} nats/token"
    ref_val = [r["val_loss"] for r in records(fsdp_runs["zero0"], "eval")]
    got_val = [r["val_loss"] for r in records(fsdp_runs["fsdp"], "eval")]
    assert len(got_val) == 3 and got_val == pytest.approx(ref_val, abs=FSDP_TOLERANCE)
    ref_train, got_train = records(fsdp_runs["zero0"], "train"), records(fsdp_runs["fsdp"], "train")
    assert [r["lr"] for r in got_train] == [r["lr"] for r in ref_train]  # the same schedule function
    assert [r["grad_norm"] for r in got_train] == pytest.approx([r["grad_norm"] for r in ref_train], rel=1e-4)
    config = records(fsdp_runs["fsdp"], "config")[0]
    assert config["engine"] == "fsdp" and config["world_size"] == 2 and config["zero_stage"] is None
    assert config["fsdp_config"]["train_batch_size"] == 16


@pytest.mark.slow
def test_fsdp_resume_reproduces_losses(fsdp_runs):
    full, resumed = train_losses(fsdp_runs["fsdp"]), train_losses(fsdp_runs["resumed"])
    assert sorted(resumed) == list(range(11, 21))
    assert [resumed[s] for s in range(11, 21)] == [full[s] for s in range(11, 21)]  # exact on CPU fp32
    assert records(fsdp_runs["resumed"], "resumed")[0]["checkpoint"] == "step_000010"
    assert records(fsdp_runs["resumed"], "config")[0]["engine"] == "fsdp"
    assert records(fsdp_runs["resumed"], "eval")[-1]["val_loss"] == records(fsdp_runs["fsdp"], "eval")[-1]["val_loss"]


@pytest.mark.slow
def test_fsdp_checkpoint_is_complete_and_marked(fsdp_runs):
    root = ckpt.ckpt_root(fsdp_runs["fsdp"])
    assert (root / "latest").read_text() == "step_000020"
    for tag in ("step_000010", "step_000020"):
        assert ckpt.verify(root / tag) is None and ckpt.checkpoint_kind(root / tag) == "fsdp"
        names = {p.name for p in (root / tag).iterdir()}
        assert {"rng_rank0.pt", "rng_rank1.pt", "train_config.json", "fsdp_config.json", "fsdp"} <= names
        assert "ds_config.json" not in names
        manifest = json.loads((root / tag / ckpt.MANIFEST).read_text())["files"]
        assert "fsdp/.metadata" in manifest and any(k.endswith(".distcp") for k in manifest)
    marker = json.loads((root / "step_000010" / "fsdp_checkpoint.json").read_text())
    assert marker["client_state"]["step"] == 10 and marker["world_size"] == 2
    train_config, engine_config, _ = ckpt.load_side_files(root / "step_000020")
    assert train_config["engine"] == "fsdp" and engine_config["engine"] == "fsdp"


@pytest.mark.slow
def test_fsdp_export_reproduces_the_trained_model(fsdp_runs, tiny_data, tmp_path):
    from models.weights import load_consolidated

    out = fsdp_runs["fsdp"]
    model, info = load_consolidated(out / "export")
    assert info["step"] == 20 and info["train_config"]["engine"] == "fsdp"
    logged = records(out, "eval")[-1]["val_loss"]
    assert replayed_val_loss(model, info, tiny_data) == pytest.approx(logged, abs=1e-5)
    x = torch.arange(32).view(1, 32) % 39
    ref, _ = load_consolidated(fsdp_runs["zero0"] / "export")
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-4, rtol=1e-4)
    # the CLI, from one tag dir, gives the same weights as the end-of-training export
    proc = subprocess.run([PY, "-m", "training.export", "--ckpt", str(ckpt.ckpt_root(out) / "step_000020"),
                           "--out", str(tmp_path / "e")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    again, _ = load_consolidated(tmp_path / "e")
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k


@pytest.mark.slow
def test_inference_loads_an_fsdp_run_without_an_export(fsdp_runs, tmp_path):
    """inference.load_model consolidates a training checkpoint it is given (in a subprocess), FSDP too."""
    from inference.loading import load_model
    from models.weights import load_consolidated

    run = tmp_path / "run"
    shutil.copytree(fsdp_runs["fsdp"] / "ckpt", run / "ckpt")  # no export/ beside it
    loaded = load_model(ckpt=str(run), log=lambda msg: None)
    ref, _ = load_consolidated(fsdp_runs["fsdp"] / "export")
    for (k, a), (k2, b) in zip(loaded.model.state_dict().items(), ref.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k


@pytest.mark.slow
def test_fsdp_checkpoint_refuses_the_other_engine(fsdp_runs):
    proc = pretrain_cli("--config", TINY_CONFIG, "--out_dir", fsdp_runs["fsdp"], "--resume", "--eval_only",
                        "--engine=deepspeed", "--data_dir", records(fsdp_runs["fsdp"], "config")[0]["data"])
    assert proc.returncode != 0
    assert "written by engine=fsdp; resume it with --engine=fsdp" in proc.stderr


@pytest.mark.slow
def test_fsdp_gradient_accumulation_matches_deepspeed(tiny_data, ds_configs, tmp_path):
    """Accumulation: backward scales by 1/accumulation and the update happens every 2nd step() in both."""
    extra = ("--data_dir", str(tiny_data), "--gradient_accumulation_steps=2", "--max_iters=4", "--export_dir=none",
             "--eval_interval=100")
    check_finished(torchrun_fsdp(tmp_path / "fsdp", *extra), tmp_path / "fsdp")
    check_finished(deepspeed_run(tmp_path / "zero0", ds_configs["zero0"], *extra), tmp_path / "zero0")
    ref, got = train_losses(tmp_path / "zero0"), train_losses(tmp_path / "fsdp")
    assert sorted(got) == [1, 2, 3, 4] and max(abs(ref[s] - got[s]) for s in ref) < FSDP_TOLERANCE


# ----------------------------------------------------------------------------- launch.sh
@pytest.mark.slow
def test_the_cpu_comm_op_is_built_where_every_run_looks_for_it():
    """`make install` runs `python -m training.cpu_comm_op`: DeepSpeed's shm op, built (or found, when the tests'
    runs built it first) in TORCH_EXTENSIONS_DIR, the cache conftest.py gives every run the tests start."""
    cache = Path(os.environ["TORCH_EXTENSIONS_DIR"])
    proc = subprocess.run([PY, "-m", "training.cpu_comm_op"], cwd=REPO, env=env_for_cpu_ranks(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and f"op is built in {cache}" in proc.stdout, proc.stdout + proc.stderr
    assert (cache / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").is_file()


def test_the_cpu_comm_op_is_not_built_where_cuda_is_available(monkeypatch, capsys):
    """GPU ranks communicate through NCCL: make install builds nothing there (CUDA simulated)."""
    from training import cpu_comm_op

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpu_comm_op.main([]) == 0
    assert "a CUDA GPU is available (ranks use NCCL): nothing to build" in capsys.readouterr().out


@pytest.mark.slow
def test_launch_sh_end_to_end(tmp_path):
    """`bash launch.sh` on the smallest settings: prepares the data it lacks, trains 2 ranks with
    ZeRO-2, exports, prints the val NELBO and a sample."""
    env = env_for_cpu_ranks()
    env.pop("OMP_NUM_THREADS")  # launch.sh chooses it
    env.update(CONFIG=str(TINY_CONFIG), OUT_DIR=str(tmp_path / "out"), DATA_DIR=str(tmp_path / "data"),
               MAX_ITERS="4", SAMPLES="1", WANDB_MODE="offline")  # no key, no network: must not hang
    proc = subprocess.run(["bash", "launch.sh", "--eval_interval=2", "--wandb_mode=offline"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=400)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert (tmp_path / "data" / "meta.json").is_file()
    assert "val NELBO" in output and "PPL <=" in output
    assert (tmp_path / "out" / "export" / "model.safetensors").is_file()
    assert records(tmp_path / "out")[-1]["kind"] == "done"
    assert (tmp_path / "out" / "wandb").is_dir()  # offline wandb writes beside the run, never hangs
    assert "== samples" in output


# ----------------------------------------------------------------------------- config errors (one process)
def test_unknown_key_is_an_error_listing_known_keys():
    with pytest.raises(ValueError, match=r"unknown config key --n_layers; known keys: .*model\.n_layer"):
        load_config(None, ["--n_layers=4"])
    proc = pretrain_cli("--config", TINY_CONFIG, "--modle.n_layer=2")
    assert proc.returncode != 0 and "unknown config key --modle.n_layer" in proc.stderr
    assert "model.n_layer" in proc.stderr


@pytest.mark.parametrize("value, error", [("none", None), ("sha256", None),
                                          ("md5", r"checkpoint_hash='md5': expected none \| sha256")])
def test_checkpoint_hash_key_and_its_error(value, error):
    from training.config import config_help

    assert re.search(r"--checkpoint_hash=none +none \(.*\) \| sha256 \(", config_help(), re.S)  # in --help
    if error is None:
        assert load_config(None, [f"--checkpoint_hash={value}"])[0].checkpoint_hash == value
    else:
        with pytest.raises(ValueError, match=error):
            load_config(None, [f"--checkpoint_hash={value}"])


def test_engine_key_and_its_errors():
    cfg, _ = load_config(str(TINY_CONFIG), [])
    assert cfg.engine == "deepspeed"  # the default
    cfg, explicit = load_config(str(TINY_CONFIG), ["--engine=fsdp"])
    assert cfg.engine == "fsdp" and "engine" in explicit
    with pytest.raises(ValueError, match=r"engine='fdsp': expected deepspeed \| fsdp"):
        load_config(None, ["--engine=fdsp"])
    proc = pretrain_cli("--config", TINY_CONFIG, "--engine=megatron")
    assert proc.returncode != 0 and "engine='megatron': expected deepspeed | fsdp" in proc.stderr
    # FSDP with a DeepSpeed JSON as well: test_faults.py::test_fsdp_with_a_deepspeed_json_is_refused


def test_fsdp_settings_come_from_the_train_config():
    from training.engines.fsdp_engine import resolve_fsdp
    from training.optim import build_lr_scheduler, build_optimizer, warmup_cosine_lr
    from models.gpt import GPT

    cfg, _ = load_config(str(TINY_CONFIG), ["--engine=fsdp", "--model.vocab_size=40"])
    r = resolve_fsdp(cfg, world_size=2)
    assert r.config["train_batch_size"] == 16 and r.config["gradient_clipping"] == cfg.grad_clip
    assert r.client_optimizer == {"lr": 3e-3, "betas": [0.9, 0.99], "eps": 1e-8, "weight_decay": 0.1}
    assert cfg.dtype == "fp32" and r.config["mixed_precision"]["param_dtype"] == "fp32"  # CPU
    # the same optimizer and schedule as the DeepSpeed engine builds
    opt = build_optimizer(GPT(cfg.model), r.client_optimizer)
    sched = build_lr_scheduler(opt, r.client_scheduler)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([warmup_cosine_lr(s, **r.client_scheduler) for s in range(8)], rel=1e-12)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    cfg, _ = load_config(str(TINY_CONFIG), ["--engine=fsdp", "--dtype=fp16"])
    with pytest.raises(ValueError, match="engine=fsdp trains in fp32 or bf16"):
        resolve_fsdp(cfg, world_size=1)


def test_config_record_traces_the_run_to_its_code(tmp_path):
    """The first metrics record of every run carries provenance(REPO): the git commit (None outside a
    checkout, never an error) and the versions of Python and the libraries that decide the numbers."""
    import deepspeed
    import numpy as np

    from training.metrics import provenance

    here = provenance(REPO)
    assert here["git_commit"] == git_head()
    assert here["versions"] == {"python": sys.version.split()[0], "torch": torch.__version__,
                                "deepspeed": deepspeed.__version__, "triton": here["versions"]["triton"],
                                "numpy": np.__version__}
    assert here["versions"]["triton"]
    (tmp_path / "code").mkdir()  # a copy of the code without .git
    assert provenance(tmp_path / "code")["git_commit"] is None
    assert provenance(tmp_path / "code")["git_dirty"] is None


def test_checkpointer_decides_when_to_save(tmp_path):
    from training.checkpointing.checkpointer import Checkpointer

    saver = Checkpointer(tmp_path, rank=0, interval=10, keep=3, train_config={}, engine_config={},
                         engine_config_name=ckpt.DS_CONFIG, data_meta={})
    assert [s for s in range(1, 31) if saver.should_save(s)] == [10, 20, 30]
    assert saver.should_save(7, stopping=True) and saver.should_save(7, last=True)
    never = Checkpointer(tmp_path, 0, interval=0, keep=3, train_config={}, engine_config={},
                         engine_config_name=ckpt.DS_CONFIG, data_meta={})
    assert not any(never.should_save(s) for s in range(1, 31)) and never.should_save(5, last=True)


def test_engine_interface_imports_no_engine():
    """training.engines.interface is the interface: it imports neither engine (nor DeepSpeed, which must come after
    prepare_environment), and the FSDP engine does not import the DeepSpeed one."""
    code = ("import sys; import training.engines.interface; "
            "assert not {'training.engines.fsdp_engine', 'training.engines.deepspeed_engine', 'deepspeed'} & set(sys.modules); "
            "import training.engines.fsdp_engine, training.checkpointing.checkpointer, training.optim; "
            "assert not {'training.engines.deepspeed_engine', 'deepspeed'} & set(sys.modules)")
    proc = subprocess.run([PY, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_overrides_file_then_flags(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('max_iters = 7\n[model]\nn_layer = 3\n')
    cfg, explicit = load_config(str(f), ["--model.n_layer", "5", "--compile", "--objective=mdlm"])
    assert (cfg.max_iters, cfg.model.n_layer, cfg.compile) == (7, 5, True)
    assert {"max_iters", "model.n_layer", "compile", "objective.name"} <= explicit
    with pytest.raises(ValueError, match="needs one of .'causal'"):
        load_config(None, ["--objective=ar"])  # the default model is bidirectional


def test_bd3lm_config_and_its_errors():
    cfg, _ = load_config(str(REPO / "training/configs/shakespeare_bd3lm.json"), [])
    assert (cfg.objective.name, cfg.model.attention, cfg.model.block_length) == ("bd3lm", "block_causal", 8)
    assert cfg.out_dir == "out/shakespeare_bd3lm" and cfg.model.block_size % cfg.model.block_length == 0
    with pytest.raises(ValueError, match="needs one of .'block_causal',."):
        load_config(None, ["--objective=bd3lm"])  # the default model is bidirectional
    with pytest.raises(ValueError, match="block_size=64 tokens, which must be a multiple of model.block_length=5"):
        load_config(None, ["--objective=bd3lm", "--model.attention=block_causal", "--model.block_length=5"])
    with pytest.raises(ValueError, match="block_length >= 1"):
        load_config(None, ["--objective=bd3lm", "--model.attention=block_causal", "--model.block_length=0"])


def test_ds_json_auto_is_filled_from_the_train_config():
    cfg, explicit = load_config(str(TINY_CONFIG), [])
    ds = resolve(load_ds_json(REPO / "ds_configs/zero2.json"), cfg, explicit, world_size=2)
    c = ds.config
    assert (c["train_micro_batch_size_per_gpu"], c["gradient_accumulation_steps"], c["train_batch_size"]) == (8, 1, 16)
    assert c["gradient_clipping"] == cfg.grad_clip and "optimizer" not in c  # torch AdamW is built by us
    assert ds.client_optimizer["lr"] == cfg.learning_rate and ds.client_scheduler["decay_iters"] == 40
    assert c["bf16"]["enabled"] is False and c["fp16"]["enabled"] is False  # fp32 on CPU


def test_ds_json_contradiction_names_both_values(tiny_data, tmp_path):
    ds_json = load_ds_json(REPO / "ds_configs/zero2.json")
    ds_json["train_micro_batch_size_per_gpu"] = 4
    cfg, explicit = load_config(str(TINY_CONFIG), [])  # the file states batch_size 8
    with pytest.raises(ConfigConflict, match=r"train_micro_batch_size_per_gpu=4 .* batch_size=8"):
        resolve(ds_json, cfg, explicit, world_size=2)
    # stated only in the JSON: the train config adopts it
    cfg, _ = load_config(None, [])
    resolve(ds_json, cfg, set(), world_size=2)
    assert cfg.batch_size == 4
    # and through the CLI
    path = tmp_path / "ds.json"
    ds_json["train_micro_batch_size_per_gpu"] = "auto"
    ds_json["gradient_clipping"] = 0.5
    path.write_text(json.dumps(ds_json))
    proc = pretrain_cli("--config", TINY_CONFIG, "--deepspeed_config", path, "--grad_clip=2.0",
                        f"--data_dir={tiny_data}", f"--out_dir={tmp_path / 'out'}")
    assert proc.returncode != 0
    assert "gradient_clipping=0.5" in proc.stderr and "grad_clip=2.0" in proc.stderr


def test_global_batch_from_the_json_sets_accumulation():
    ds_json = load_ds_json(REPO / "ds_configs/zero1.json")
    ds_json["train_batch_size"] = 64
    cfg, explicit = load_config(None, ["--batch_size=8"])
    resolve(ds_json, cfg, explicit, world_size=2)
    assert cfg.gradient_accumulation_steps == 4  # 64 = 8 x 4 x 2
    # tiny_test.json states gradient_accumulation_steps=1 itself: 8 x 1 x 2 = 16 contradicts 64
    with pytest.raises(ConfigConflict, match=r"train_batch_size=64 but batch_size=8 x gradient_accumulation_steps=1"):
        resolve(ds_json, *load_config(str(TINY_CONFIG), []), world_size=2)
    ds_json["train_batch_size"] = 60
    with pytest.raises(ConfigConflict, match="train_batch_size=60"):
        resolve(ds_json, *load_config(None, ["--batch_size=8"]), world_size=2)


def test_latest_marker_falls_back_over_incomplete_and_corrupt_tags(tmp_path):
    root = ckpt.ckpt_root(tmp_path)
    for step in (10, 20):
        d = root / ckpt.tag_for(step)
        d.mkdir(parents=True)
        (d / "model.pt").write_bytes(b"x" * 100)
        ckpt.finalize(root, d.name, step, keep=5)
    (root / "step_000030").mkdir()  # a save that died before its manifest
    (root / "step_000030" / "model.pt").write_bytes(b"half")
    assert ckpt.find_latest_good(tmp_path).tag == "step_000020"
    (root / "step_000020" / "model.pt").write_bytes(b"x" * 50)  # truncated
    found = ckpt.find_latest_good(tmp_path)
    assert found.tag == "step_000010" and any("50 bytes" in s for s in found.skipped)
    (root / "latest").unlink()  # no marker: the newest verified tag
    assert ckpt.find_latest_good(tmp_path).tag == "step_000010"


SHARD_BYTES = 4 << 20  # so that the few KB of JSON a save or a resume reads besides the shards are noise


def bytes_read() -> int:
    """Bytes this process has read so far, from disk or the page cache (/proc/self/io rchar)."""
    return int(next(line.split()[1] for line in Path("/proc/self/io").read_text().splitlines()
                    if line.startswith("rchar:")))


def shard_tag(root: Path, step: int) -> Path:
    """A tag dir as the engine leaves it before the manifest: a shard of SHARD_BYTES and a side file."""
    tag_dir = root / ckpt.tag_for(step)
    tag_dir.mkdir(parents=True)
    (tag_dir / "shard.bin").write_bytes(random.Random(step).randbytes(SHARD_BYTES))
    for name in ("train_config.json", "ds_config.json", "data_meta.json"):
        (tag_dir / name).write_text("{}")
    return tag_dir


@pytest.mark.parametrize("checkpoint_hash", ["none", "sha256"])
@pytest.mark.parametrize("damage, caught_by", [("one flipped byte", ["sha256"]), ("truncated", ["none", "sha256"]),
                                              ("removed", ["none", "sha256"])])
def test_a_damaged_shard_is_skipped_when_its_manifest_can_tell(tmp_path, checkpoint_hash, damage, caught_by):
    """Sizes catch a torn save's missing or short shard; a changed byte of the same size takes a sha256."""
    root = ckpt.ckpt_root(tmp_path)
    for step in (10, 20):
        tag_dir = shard_tag(root, step)
        ckpt.finalize(root, tag_dir.name, step, keep=5,
                      sha256=ckpt.sha256_share(tag_dir, 0, 1) if checkpoint_hash == "sha256" else None)
    shard = root / "step_000020" / "shard.bin"
    data = bytearray(shard.read_bytes())
    if damage == "one flipped byte":
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif damage == "truncated":
        shard.write_bytes(bytes(data[:100]))
    else:
        shard.unlink()
    found = ckpt.find_latest_good(tmp_path)
    if checkpoint_hash in caught_by:
        said = {"one flipped byte": "shard.bin does not match its sha256 in the manifest",
                "truncated": f"shard.bin has 100 bytes, the manifest says {SHARD_BYTES}",
                "removed": "shard.bin is missing"}[damage]
        assert found.tag == "step_000010" and found.skipped == [f"step_000020: {said}"]
    else:
        assert found.tag == "step_000020" and found.skipped == []


@pytest.mark.parametrize("checkpoint_hash, times_read", [("none", 0), ("sha256", 1)])
def test_a_save_and_a_resume_read_the_shards_at_most_once(tmp_path, checkpoint_hash, times_read):
    """By default neither the save nor the check on resume reads a shard (sizes come from stat); with
    sha256 each reads it once: the save hashes every file once and reads nothing back after the manifest."""
    root = ckpt.ckpt_root(tmp_path)
    tag_dir = shard_tag(root, 10)
    before = bytes_read()
    if checkpoint_hash == "sha256":
        ckpt.finalize(root, tag_dir.name, 10, 2, ckpt.sha256_share(tag_dir, 0, 1))
    else:
        ckpt.finalize(root, tag_dir.name, 10, 2)
    saving = bytes_read() - before
    before = bytes_read()
    assert ckpt.find_latest_good(tmp_path).tag == tag_dir.name
    resuming = bytes_read() - before
    for what, read in (("the save", saving), ("the resume's check", resuming)):
        assert times_read * SHARD_BYTES <= read < (times_read + 0.25) * SHARD_BYTES, \
            f"{what} read {read / SHARD_BYTES:.2f} x the shard's bytes, expected {times_read}"


def test_sha256_shares_split_the_files_over_the_ranks(tmp_path):
    """Every file in exactly one rank's share, the biggest ones spread, each digest that of the file."""
    tag_dir = tmp_path / "step_000001"
    tag_dir.mkdir()
    sizes = {"a.pt": 900, "b.pt": 800, "c.pt": 300, "sub/d.pt": 200, "e.json": 10}
    for name, size in sizes.items():
        (tag_dir / name).parent.mkdir(exist_ok=True)
        (tag_dir / name).write_bytes(bytes(size))
    shares = [ckpt.sha256_share(tag_dir, rank, 2) for rank in range(2)]
    assert sorted(shares[0]) == ["a.pt", "e.json", "sub/d.pt"] and sorted(shares[1]) == ["b.pt", "c.pt"]
    assert {**shares[0], **shares[1]} == ckpt.sha256_share(tag_dir, 0, 1) == \
        {n: hashlib.sha256(bytes(size)).hexdigest() for n, size in sizes.items()}


RESUME_ON_A_RANK = """
import json, sys
import torch.distributed as dist
from training.checkpointing.checkpointer import ResumePoint

def bytes_read():
    return int(next(line.split()[1] for line in open("/proc/self/io") if line.startswith("rchar:")))

dist.init_process_group("gloo")
before = bytes_read()
point = ResumePoint.find(sys.argv[1])
print(json.dumps({"tag": point.tag, "skipped": point.skipped, "read": bytes_read() - before}))
dist.destroy_process_group()
"""


def test_on_several_ranks_rank_0_verifies_and_hands_the_others_its_choice(tmp_path):
    """Two ranks in a gloo group resume from sha256 checkpoints whose newest has a flipped byte: rank 0
    reads both to find step 10, rank 1 reads neither and resumes from the same tag, with the same note."""
    root = ckpt.ckpt_root(tmp_path)
    for step in (10, 20):
        tag_dir = shard_tag(root, step)
        ckpt.finalize(root, tag_dir.name, step, keep=5, sha256=ckpt.sha256_share(tag_dir, 0, 1))
    with open(root / "step_000020" / "shard.bin", "r+b") as f:
        f.seek(SHARD_BYTES // 2)
        f.write(b"!")
    env = {**env_for_cpu_ranks(), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    ranks = [subprocess.Popen([PY, "-c", RESUME_ON_A_RANK, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(2)]
    try:
        outputs = [proc.communicate(timeout=120) for proc in ranks]
    finally:
        for proc in ranks:
            proc.kill()
    assert all(proc.returncode == 0 for proc in ranks), outputs
    rank0, rank1 = (json.loads(out.strip().splitlines()[-1]) for out, _ in outputs)
    note = ["step_000020: shard.bin does not match its sha256 in the manifest"]
    assert rank0["tag"] == rank1["tag"] == "step_000010" and rank0["skipped"] == rank1["skipped"] == note
    assert rank0["read"] >= 2 * SHARD_BYTES and rank1["read"] < 0.25 * SHARD_BYTES, (rank0, rank1)


def test_keep_checkpoints_prunes_old_tags(tmp_path):
    root = ckpt.ckpt_root(tmp_path)
    for step in (1, 2, 3):
        (root / ckpt.tag_for(step)).mkdir(parents=True)
        (root / ckpt.tag_for(step) / "f").write_text(str(step))
        ckpt.finalize(root, ckpt.tag_for(step), step, keep=2)
    assert [t for _, t in ckpt.list_tags(root)] == ["step_000002", "step_000003"]


def test_checkpoint_kind_is_read_from_file_names(tmp_path):
    """training.checkpointing.layout.checkpoint_kind is the one place that says what a directory holds (inference
    asks it before loading): a run dir, its ckpt/ and a tag dir all name the engine that wrote them."""
    from models.gpt import GPT, GPTConfig
    from models.weights import save_consolidated

    run = tmp_path / "run"
    root = ckpt.ckpt_root(run)
    tag = root / ckpt.tag_for(5)
    tag.mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"")
    ckpt.finalize(root, tag.name, 5, keep=1)
    assert [ckpt.checkpoint_kind(p) for p in (run, root, tag)] == ["deepspeed"] * 3
    assert ckpt.latest_tag_dir(run) == ckpt.latest_tag_dir(root) == tag
    (tag / ckpt.FSDP_MARKER).write_text("{}")
    assert [ckpt.checkpoint_kind(p) for p in (run, root, tag)] == ["fsdp"] * 3
    model = GPT(GPTConfig(block_size=8, vocab_size=64, n_layer=1, n_head=1, n_embd=16))
    save_consolidated(model.state_dict(), {"model": model.config.to_dict()}, run / "export")
    assert ckpt.checkpoint_kind(run / "export") == "consolidated"
    hf = tmp_path / "hf"  # a Hugging Face dir has the same two file names, without our "format"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "gpt2"}')
    (hf / "model.safetensors").write_bytes(b"")
    assert ckpt.checkpoint_kind(hf) is None
    assert ckpt.checkpoint_kind(tmp_path / "missing") is None and ckpt.checkpoint_kind(tmp_path) is None
