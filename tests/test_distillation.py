"""Distillation through time (models/distillation.py, training/distillation.py), as specified:

  - the loss equals a direct per-token computation: the teacher's two ancestral steps (the first one's
    commits and draws from their generators) against the student's one step, for every divergence
  - the teacher gets no gradient, stays in eval mode, and is in neither the student's parameters, its state
    dict nor its optimizer
  - rounds: which round and how many steps at each training step; what an export records
  - a 2-rank DeepSpeed run equals a 1-rank run (same global batch) within tolerance, a run resumed in the
    middle of round 2 (teacher = round 1's exported student) reproduces the uninterrupted losses exactly, and
    the checkpoints and exports hold the student alone
  - inference decodes a distilled export in its steps unless told otherwise
  - bad input: an AR teacher, a teacher of another vocabulary, steps that do not halve the teacher's,
    rounds that do not split max_iters, a block-diffusion objective
"""
import json
import shutil
from pathlib import Path

import pytest
import torch

from inference.api import DecodeOptions, generate_with_stats
from inference.loading import load_model
from models.diffusion import NoiseSchedule, forward_process
from models.distillation import DIVERGENCES, distillation_loss
from models.gpt import GPT, GPTConfig
from models.tokenizer import get_tokenizer
from models.weights import save_consolidated
from training.config import load_config
from training.distillation import (DistillationModule, RoundPlan, check_distillation, distillation_record,
                                   load_teacher, round_dir)
from training.export import consolidated_state_dict
from training.optim import build_optimizer

from test_training import DEEPSPEED, REPO, check_finished, env_for_cpu_ranks, python_run, records, train_losses
from tiny_models import TOK, export_tiny

MASK = TOK.mask_id
# fp32 forward passes of the same weights, summed in another order (a per-token loop vs one batched call)
LOSS_TOL = 1e-5
# 2 ranks vs 1 rank x 2 accumulation steps: the same batches, masks and teacher draws; the gradients are
# all-reduced in another order (~1e-7 seen), as between ZeRO stages in test_training
RANKS_TOL = 1e-5


def tiny_gpt(seed: int) -> GPT:
    """A random model with peaked predictions (its tied embedding scaled up: logits of std ~2 instead of ~0.1),
    so that teacher, student and the teacher's two steps disagree visibly."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=16, vocab_size=TOK.padded_vocab_size, n_layer=2, n_head=2, n_embd=32,
                          attention="bidirectional", pos_emb="rope")).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model


# ----------------------------------------------------------------------------- the loss
def hand_rolled_loss(student, teacher, x0, t, N, seed, name):
    """Every masked token one at a time: its target from the teacher's two steps t -> t - 1/2N -> t - 1/N (the
    first step's commit draws u < p, then one Gumbel-max draw per committed token, in reading order), the
    student's one-step distribution, and the divergence written out in float64."""
    sched = NoiseSchedule()
    xt, _ = forward_process(x0, sched, MASK, seed, t=t)
    gen = torch.Generator().manual_seed(seed + 2)
    u = torch.rand(xt.shape, generator=gen)
    alpha = lambda v: 1 - (1 - sched.eps) * v.double()  # noqa: E731  (loglinear)
    with torch.no_grad():
        p1 = torch.softmax(teacher(xt)[..., :MASK].double(), -1)  # (B, T, V)
        first = [(b, i) for b in range(xt.size(0)) for i in range(xt.size(1))
                 if xt[b, i] == MASK and u[b, i] < (alpha(t[b] - 1 / (2 * N)) - alpha(t[b])) / (1 - alpha(t[b]))]
        x_mid = xt.clone()
        g = torch.rand((len(first), MASK), generator=gen, dtype=torch.float64)
        for n, (b, i) in enumerate(first):
            x_mid[b, i] = torch.argmax(p1[b, i].log() - torch.log(-torch.log(g[n])))
        p2 = torch.softmax(teacher(x_mid)[..., :MASK].double(), -1)
    q_all = torch.softmax(student(xt)[..., :MASK].double(), -1)
    total, count = 0.0, 0
    for b in range(xt.size(0)):
        for i in range(xt.size(1)):
            if xt[b, i] != MASK:
                continue
            p = p1[b, i] if (b, i) in first else p2[b, i]
            q = q_all[b, i]
            total += {"kl": (p * (p.log() - q.log())).sum(), "reverse_kl": (q * (q.log() - p.log())).sum(),
                      "tvd": 0.5 * (p - q).abs().sum(), "mse": ((q.log() - p.log()) ** 2).mean()}[name]
            count += 1
    return total / count


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("N", [1, 4])
def test_loss_is_the_teachers_two_steps_against_the_students_one(divergence, N):
    teacher, student = tiny_gpt(0), tiny_gpt(1)
    x0 = torch.randint(0, MASK, (4, 16), generator=torch.Generator().manual_seed(2))
    t = torch.tensor([1.0, 0.75, 0.5, 0.25]) if N == 4 else torch.ones(4)  # points of the student's grid
    got = distillation_loss(student, teacher, x0, NoiseSchedule(), MASK, seed=7, student_steps=N,
                            divergence_name=divergence, t=t)
    want = hand_rolled_loss(student, teacher, x0, t, N, 7, divergence)
    assert abs(got.item() - want.item()) < LOSS_TOL * max(1.0, abs(want.item()))


def test_nothing_masked_is_a_zero_loss_that_still_backpropagates():
    # every rank must run backward even when its batch has no masked token (ZeRO's collectives)
    model = tiny_gpt(0)
    x0 = torch.randint(0, MASK, (3, 16), generator=torch.Generator().manual_seed(3))
    loss = distillation_loss(model, tiny_gpt(1), x0, NoiseSchedule(), MASK, seed=1, student_steps=2,
                             t=torch.full((3,), 1e-6))  # alpha ~ 1: nothing masked
    loss.backward()
    assert loss.item() == 0.0 and model.lm_head.weight.grad is not None


def test_teacher_gets_no_gradient_and_is_not_in_the_optimizer():
    teacher = tiny_gpt(0).requires_grad_(False)
    student = tiny_gpt(1)
    module = DistillationModule(student, load_config(None, [])[0].objective, MASK, "kl")
    module.set_teacher(teacher, student_steps=4)
    module.train()
    x = torch.randint(0, MASK, (4, 16), generator=torch.Generator().manual_seed(0))
    module(x, x, seed=3).backward()
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert not teacher.training  # module.train() does not reach it: it is no submodule
    assert teacher_ids.isdisjoint(id(p) for p in module.parameters())
    assert all(k.startswith("gpt.") for k in module.state_dict())  # what an engine checkpoints
    optimizer = build_optimizer(module.gpt, dict(lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1))
    assert teacher_ids.isdisjoint(id(p) for g in optimizer.param_groups for p in g["params"])
    module.eval()  # validation: the student's NELBO, no teacher involved
    module.set_teacher(None, 4)
    assert torch.isfinite(module(x, x, seed=3))


# ----------------------------------------------------------------------------- rounds and records
def test_rounds_halve_the_steps_and_exports_record_them():
    plan = RoundPlan(teacher_steps=64, rounds=3, round_iters=100)
    assert [plan.training_round(s) for s in (0, 99, 100, 250, 299, 300)] == [1, 1, 2, 3, 3, 3]
    assert [plan.student_steps(k) for k in (0, 1, 2, 3)] == [64, 32, 16, 8]
    cfg = {"distill_from": "out/teacher", "distill_steps": 8, "distill_rounds": 3, "max_iters": 300,
           "distill_divergence": "kl"}
    assert [distillation_record(cfg, s)["steps"] for s in (0, 50, 100, 101, 200, 300)] == [64, 32, 32, 16, 16, 8]
    assert distillation_record(cfg, 300) == {"teacher": "out/teacher", "teacher_steps": 64, "steps": 8, "round": 3,
                                             "rounds": 3, "steps_per_round": [32, 16, 8], "round_iters": 100,
                                             "divergence": "kl"}
    assert distillation_record({"distill_from": ""}, 10) is None


def test_a_distilled_export_decodes_in_its_steps_by_default(tmp_path):
    plain = export_tiny(tmp_path / "plain")
    info = json.loads((plain / "config.json").read_text())
    distilled = tmp_path / "distilled"
    shutil.copytree(plain, distilled)
    (distilled / "config.json").write_text(json.dumps({**info, "distillation": {"steps": 4, "teacher": "x"}}))
    for path, default_steps in ((plain, 16), (distilled, 4)):
        loaded = load_model(ckpt=str(path), device="cpu", log=lambda *a: None)
        done = generate_with_stats(loaded.model, loaded.tokenizer, ["ab"], 16, "ancestral", seed=0)
        assert done[0].steps == default_steps  # time steps walked (free ones included)
        assert generate_with_stats(loaded.model, loaded.tokenizer, ["ab"], 16, "ancestral", steps=8)[0].steps == 8
        # the server resolves its options through for_model too; other rules keep their own defaults
        assert DecodeOptions().for_model(loaded.model).steps == (None if path == plain else 4)
        assert DecodeOptions(strategy="topk").for_model(loaded.model).steps is None


# ----------------------------------------------------------------------------- bad input
def distill_config(tmp_path, teacher, *flags):
    cfg, explicit = load_config(None, ["--distill_from", str(teacher), "--model.block_size=64", *flags])
    check_distillation(cfg, TOK.to_meta(), explicit)
    return cfg


def test_rounds_are_derived_from_the_teachers_steps(tmp_path):
    teacher = export_tiny(tmp_path / "teacher")  # 64-token context: 64 steps of one token
    cfg = distill_config(tmp_path, teacher, "--distill_steps=8", "--max_iters=300")
    assert (cfg.distill_rounds, cfg.init_from) == (3, str(teacher))
    cfg = distill_config(tmp_path, teacher, "--distill_steps=6", "--distill_rounds=1", "--max_iters=300")
    assert RoundPlan.of(cfg).teacher_steps == 12  # stated rounds: the teacher starts at 6 * 2^1


@pytest.mark.parametrize("flags,message", [
    (["--distill_steps=6"], "choose one of 32, 16, 8, 4, 2, 1"),
    (["--distill_steps=64"], "choose one of 32"),
    (["--distill_steps=8", "--max_iters=100"], "does not split evenly over 3 rounds; use --max_iters=99"),
])
def test_steps_that_do_not_halve_the_teachers_are_an_error(tmp_path, flags, message):
    teacher = export_tiny(tmp_path / "teacher")
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        distill_config(tmp_path, teacher, *flags)


def test_an_ar_teacher_is_an_error(tmp_path):
    teacher = export_tiny(tmp_path / "ar", attention="causal", objective="ar")
    with pytest.raises(ValueError, match="autoregressive .* needs a masked-diffusion"):
        distill_config(tmp_path, teacher, "--distill_steps=8")


def test_a_teacher_of_another_vocabulary_is_an_error(tmp_path):
    teacher = tmp_path / "teacher"
    other = get_tokenizer("char", corpus_text="0123456789+-*/=\n")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=other.padded_vocab_size, n_layer=1, n_head=2, n_embd=32,
                          attention="bidirectional"))
    save_consolidated(model.state_dict(), {"model": model.config.to_dict(), "objective": {"name": "mdlm"},
                                           "tokenizer": other.to_meta(), "mask_id": other.mask_id,
                                           "eot_id": other.eot_id}, teacher)
    with pytest.raises(ValueError, match="teacher's predictions would mean other tokens"):
        distill_config(tmp_path, teacher, "--distill_steps=8")


@pytest.mark.parametrize("flags,message", [
    (["--distill_from=x"], "needs --distill_steps=N"),
    (["--distill_from=x", "--distill_steps=8", "--distill_divergence=js"], "expected one of kl | reverse_kl"),
    (["--distill_from=x", "--distill_steps=8", "--objective=bd3lm", "--model.attention=block_causal",
      "--model.block_length=8"], "mdlm student"),
    (["--distill_from=x", "--distill_steps=8", "--distill_rounds=3", "--max_iters=100"], "split evenly"),
])
def test_distillation_keys_are_checked_with_the_config(flags, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, flags)


def test_a_missing_teacher_names_what_to_give(tmp_path):
    with pytest.raises(FileNotFoundError, match="--distill_from .*: no such directory"):
        distill_config(tmp_path, tmp_path / "nope", "--distill_steps=8")


# ----------------------------------------------------------------------------- real runs (1 and 2 ranks)
FAST = ["--wandb_mode=disabled", "--no_tensorboard", "--no_progress_bar", "--log_interval=1", "--eval_iters=2",
        "--eval_interval=8", "--max_iters=8", "--distill_steps=8", "--checkpoint_interval=2", "--keep_checkpoints=8"]


@pytest.fixture(scope="module")
def teacher_export(tiny_data, tmp_path_factory) -> Path:
    """A random-weight mdlm of the tiny data's tokenizer with tiny_test.json's shape (32-token context: the
    2 rounds 32 -> 16 -> 8 steps, 4 optimizer steps each)."""
    meta = json.loads((tiny_data / "meta.json").read_text())
    cfg, _ = load_config(str(REPO / "training/configs/tiny_test.json"), [f"--model.vocab_size={meta['padded_vocab_size']}"])
    torch.manual_seed(5)
    model = GPT(cfg.model)
    tok_meta = get_tokenizer_meta(tiny_data)
    out = tmp_path_factory.mktemp("teacher") / "export"
    save_consolidated(model.state_dict(), {"model": cfg.model.to_dict(), "objective": {"name": "mdlm"},
                                           "tokenizer": tok_meta, "mask_id": meta["mask_id"], "eot_id": meta["eot_id"]},
                      out)
    return out


def get_tokenizer_meta(data_dir) -> dict:
    from models.tokenizer import tokenizer_from_meta
    from training.data import load_meta
    return tokenizer_from_meta(load_meta(data_dir)).to_meta()


@pytest.fixture(scope="module")
def distill_runs(tiny_data, teacher_export, tmp_path_factory) -> dict:
    """The same 2-round distillation: 2 ranks (ZeRO-2), 1 rank with 2 accumulation steps, and the 1-rank run
    resumed from its step-6 checkpoint (the middle of round 2)."""
    import subprocess

    from common.ports import free_port

    root = tmp_path_factory.mktemp("distill")
    common = ["--config", "training/configs/tiny_test.json", f"--data_dir={tiny_data}",
              f"--distill_from={teacher_export}", *FAST]
    two = root / "two_ranks"
    proc = subprocess.run([DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "training/pretrain.py",
                           *common, f"--out_dir={two}"], cwd=REPO, env=env_for_cpu_ranks(), capture_output=True,
                          text=True, timeout=300)
    check_finished(proc, two)
    one = root / "one_rank"
    proc = python_run(*common, f"--out_dir={one}", "--gradient_accumulation_steps=2")
    check_finished(proc, one)
    resumed = root / "resumed"
    (resumed / "ckpt").mkdir(parents=True)
    shutil.copytree(one / "ckpt" / "step_000006", resumed / "ckpt" / "step_000006")
    (resumed / "ckpt" / "latest").write_text("step_000006")
    shutil.copytree(one / "rounds", resumed / "rounds")  # round 1's student: round 2's teacher
    proc = python_run(*common, f"--out_dir={resumed}", "--resume", "--gradient_accumulation_steps=2")
    check_finished(proc, resumed)
    return {"two": two, "one": one, "resumed": resumed, "resumed_log": proc.stdout + proc.stderr}


@pytest.mark.slow
def test_two_ranks_equal_one_rank(distill_runs):
    two, one = train_losses(distill_runs["two"]), train_losses(distill_runs["one"])
    assert sorted(two) == list(range(1, 9))
    assert all(abs(two[s] - one[s]) < RANKS_TOL for s in two), (two, one)
    rounds = [(r["round"], r["teacher_steps"], r["student_steps"]) for r in records(distill_runs["two"], "distill_round")]
    assert rounds == [(1, 32, 16), (2, 16, 8)]


@pytest.mark.slow
def test_resume_in_the_middle_of_a_round_reproduces_the_losses(distill_runs):
    full, resumed = train_losses(distill_runs["one"]), train_losses(distill_runs["resumed"])
    assert sorted(resumed) == [7, 8]
    assert all(resumed[s] == full[s] for s in resumed), (resumed, full)  # CPU, fp32, same draws: exact
    assert "teacher " + str(round_dir(distill_runs["resumed"], 1)) in distill_runs["resumed_log"]


@pytest.mark.slow
def test_checkpoints_and_exports_hold_the_student_alone(distill_runs, teacher_export):
    run = distill_runs["two"]
    student = sum(p.numel() for p in load_teacher(teacher_export).parameters())
    for tag in ("step_000004", "step_000008"):
        state = consolidated_state_dict(run / "ckpt" / tag)  # refuses any key outside the student ("gpt.")
        assert sum(v.numel() for k, v in state.items() if k != "lm_head.weight") == student
    for path, steps, rnd in ((round_dir(run, 1), 16, 1), (run / "export", 8, 2)):
        record = json.loads((path / "config.json").read_text())["distillation"]
        assert (record["steps"], record["round"], record["teacher"]) == (steps, rnd, str(teacher_export))
    assert load_model(ckpt=str(run), device="cpu", log=lambda *a: None).model.distilled_steps == 8


# ----------------------------------------------------------------------------- the benchmark
def test_benchmark_scores_teacher_and_every_round_and_checks_the_targets(tmp_path, capsys):
    from bench.distillation import main as bench_main

    teacher = export_tiny(tmp_path / "teacher")
    judge = export_tiny(tmp_path / "judge", attention="causal", objective="ar")
    run = tmp_path / "run"
    info = json.loads((teacher / "config.json").read_text())
    for path, steps in ((round_dir(run, 1), 8), (run / "export", 4)):
        shutil.copytree(teacher, path)
        (path / "config.json").write_text(json.dumps({**info, "distillation": {"steps": steps, "divergence": "kl"}}))
    result = bench_main(["--teacher", str(teacher), "--distilled", str(run), "--judge", str(judge), "--budgets=1,2,4",
                         "--num_samples=2", "--seeds=0,1", "--gen_length=16", "--out", str(tmp_path / "b.json"),
                         "--plot", str(tmp_path / "b.png")])
    names = [(r["model"], r["rule"], r["steps"]) for r in result["rows"]]
    assert names == [(m, rule, T) for m, rule in (("teacher", "ancestral"), ("teacher", "top-k"),
                                                  ("student round 1 (8 steps)", "ancestral"),
                                                  ("student round 2 (4 steps)", "ancestral")) for T in (16, 8, 4)]
    assert all(len(r["per_seed"]) == 2 and r["gen_ppl"] > 0 for r in result["rows"])
    assert [t["calls"] for t in result["targets"]] == ["L/4"]  # the only budget a student was distilled for
    assert (tmp_path / "b.png").stat().st_size > 0 and json.loads((tmp_path / "b.json").read_text())["L"] == 16
    assert "at L/4 calls: student round 2 (4 steps)" in capsys.readouterr().out
