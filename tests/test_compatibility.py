"""Files written by earlier code keep working: a DeepSpeed checkpoint and a consolidated export written
before the restructuring of training/, inference/ and evaluation/ (commit c80811a) are read by today's
code with the same results.

The fixture (tests/fixtures/pre_restructure/, ~650 kB) is a 2-layer char MDLM trained 10 steps by that
commit in one process under ZeRO-2 on the bundled Shakespeare corpus; reference.json records what that
code printed: the losses of steps 1..10, the logits of a fixed input and greedy top-k decodes. Only the
step-5 checkpoint is kept, so a resume must reproduce steps 6..10.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training import prepare
from training.metrics import read_records

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "pre_restructure"
REFERENCE = json.loads((FIXTURE / "reference.json").read_text())


@pytest.fixture(scope="module")
def shakespeare_char(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "shakespeare_char"
    prepare.main(["--source", "shakespeare", "--tokenizer", "char", "--out", str(out)])
    return out


def test_an_old_export_gives_the_same_logits_and_decodes():
    from inference.api import generate_with_stats
    from inference.loading import load_model

    loaded = load_model(ckpt=str(FIXTURE / "export"))
    x = torch.tensor([REFERENCE["input_ids"]])
    with torch.no_grad():
        logits = loaded.model(x).double()
    # the same float32 operations in the same order on the same CPU: only summation order may differ
    assert logits.sum().item() == pytest.approx(REFERENCE["logits_sum"], rel=1e-6)
    assert logits.abs().sum().item() == pytest.approx(REFERENCE["logits_abs_sum"], rel=1e-6)
    torch.testing.assert_close(logits[0, 0].float(), torch.tensor(REFERENCE["logits_first_row"]),
                               rtol=1e-5, atol=1e-5)
    done = generate_with_stats(loaded.model, loaded.tokenizer, ["ROMEO:", "JULIET: O"], max_new_tokens=12,
                               strategy="topk", temperature=0)
    assert [c.token_ids for c in done] == REFERENCE["topk_greedy_ids"]


@pytest.mark.slow
def test_an_old_deepspeed_checkpoint_resumes_with_the_same_losses(shakespeare_char, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(FIXTURE / "run", out)  # never train into the fixture itself
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    proc = subprocess.run(
        [sys.executable, "training/pretrain.py", "--config", "training/configs/tiny_test.json",
         "--data_dir", str(shakespeare_char), "--out_dir", str(out), "--max_iters", "10",
         "--checkpoint_interval", "5", "--deepspeed_config", "ds_configs/zero2.json", "--export_dir", "none",
         "--resume"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = read_records(out)
    resumed = {r["step"]: r["loss"] for r in records if r["kind"] == "train"}
    expected = {int(k): v for k, v in REFERENCE["train_loss_by_step"].items() if int(k) > 5}
    # the same data, masks (seeded by step) and optimizer state: bit-for-bit on the same machine
    assert resumed == pytest.approx(expected, rel=1e-6)
    val = [r["val_loss"] for r in records if r["kind"] == "eval" and r["step"] == 10]
    assert val and val[-1] == pytest.approx(REFERENCE["val_loss_by_step"]["10"], rel=1e-6)
