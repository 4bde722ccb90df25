"""Specification of model loading, `python -m inference.sample` and `python -m bench.decoding`."""
import json
import textwrap

import pytest
import torch

import inference.loading as loading
from inference import generate, load_model
from bench.decoding import CONFIDENCE_BASELINE, RANDOM_BASELINE, Row, check_targets
from bench.decoding import main as bench_main
from inference.sample import SEPARATOR
from inference.sample import main as sample_main
from tests.tiny_models import TOK, export_tiny


@pytest.fixture
def mdlm_dir(tmp_path):
    return export_tiny(tmp_path / "mdlm")


@pytest.fixture
def ar_dir(tmp_path):
    return export_tiny(tmp_path / "ar", attention="causal", objective="ar")


# ----------------------------------------------------------------------------- loading
def test_load_consolidated_model_with_its_tokenizer(mdlm_dir, ar_dir):
    m = load_model(ckpt=str(mdlm_dir), device="cpu")
    assert m.objective == "mdlm" and m.tokenizer.to_meta() == TOK.to_meta() and not m.model.training
    a = load_model(init_from=str(ar_dir), device="cpu")  # our dirs are accepted by --init_from too
    assert a.objective == "ar"
    assert len(generate(a.model, a.tokenizer, ["ab"], 5, temperature=0)) == 1


def test_training_out_dir_uses_its_export(tmp_path):
    export_tiny(tmp_path / "run" / "export")
    assert load_model(ckpt=str(tmp_path / "run"), device="cpu").source == str(tmp_path / "run" / "export")


def fake_deepspeed_run(root):
    """A run dir as training/ writes it: ckpt/latest -> ckpt/step_000010/ (contents irrelevant here)."""
    tag = root / "ckpt" / "step_000010"
    tag.mkdir(parents=True)
    (tag / "manifest.json").write_text("{}")
    (root / "ckpt" / "latest").write_text("step_000010")
    return root


def test_deepspeed_checkpoint_is_consolidated_in_a_subprocess(tmp_path, monkeypatch):
    """inference never imports DeepSpeed: it runs `python -m training.export --ckpt RUN --out RUN/export`."""
    fake_root = tmp_path / "repo"
    (fake_root / "training").mkdir(parents=True)
    (fake_root / "training" / "__init__.py").write_text("")
    source = export_tiny(tmp_path / "weights")
    (fake_root / "training" / "export.py").write_text(textwrap.dedent(f"""
        import argparse, shutil, sys
        p = argparse.ArgumentParser(); p.add_argument("--ckpt"); p.add_argument("--out"); a = p.parse_args()
        shutil.copytree({str(source)!r}, a.out, copy_function=shutil.copy)  # fresh mtimes, like a real export
        """))
    monkeypatch.setattr(loading, "REPO_ROOT", fake_root)
    run = fake_deepspeed_run(tmp_path / "run")
    logs = []
    m = load_model(ckpt=str(run), device="cpu", log=logs.append)
    assert m.source == str(run / "export") and "training.export --ckpt" in logs[0]
    # second time: the export is newer than the checkpoint, no subprocess
    logs.clear()
    load_model(ckpt=str(run), device="cpu", log=logs.append)
    assert logs == []


def test_deepspeed_checkpoint_without_export_module_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "REPO_ROOT", tmp_path / "no_repo")
    run = fake_deepspeed_run(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=r"python -m training\.export --ckpt .*run --out .*run/export"):
        load_model(ckpt=str(run))


def test_failed_consolidation_shows_the_command_and_the_error(tmp_path, monkeypatch):
    fake_root = tmp_path / "repo"
    (fake_root / "training").mkdir(parents=True)
    (fake_root / "training" / "__init__.py").write_text("")
    (fake_root / "training" / "export.py").write_text("raise SystemExit('shards of rank 1 are missing')\n")
    monkeypatch.setattr(loading, "REPO_ROOT", fake_root)
    with pytest.raises(RuntimeError, match=r"(?s)consolidating .* failed.*shards of rank 1 are missing"):
        load_model(ckpt=str(fake_deepspeed_run(tmp_path / "run")))


def test_gpt2_from_a_local_hugging_face_dir(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)).eval()
    hf.save_pretrained(tmp_path / "gpt2-tiny")
    m = load_model(init_from=str(tmp_path / "gpt2-tiny"), device="cpu")
    assert m.objective == "ar" and m.tokenizer.name == "gpt2" and m.model.config.vocab_size == 50257
    x = torch.tensor([[464, 2068, 7586]])
    torch.testing.assert_close(m.model(x), hf(x).logits, rtol=0, atol=1e-4)
    out = generate(m.model, m.tokenizer, ["Hello world", "The"], 4, temperature=0, stop_at_eot=False)
    assert len(out) == 2


# ----------------------------------------------------------------------------- sample CLI
def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        sample_main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--ckpt", "--init_from", "--start", "--num_samples", "--max_new_tokens", "--seed", "--temperature",
                 "--top_k", "--top_p", "--device", "--strategy", "--steps", "--block_length", "--threshold",
                 "--batch_size", "--prompts_file", "--out", "--show_steps", "ancestral", "threshold", "blocks"):
        assert flag in text


def test_sample_cli_writes_samples_and_jsonl(mdlm_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat\nhello\n\nab\n", encoding="utf-8")
    out = tmp_path / "samples.jsonl"
    done = sample_main(["--ckpt", str(mdlm_dir), "--prompts_file", str(prompts), "--max_new_tokens", "10",
                        "--strategy", "threshold", "--temperature", "0", "--batch_size", "2", "--out", str(out),
                        "--no_stop_at_eot", "--no_progress"])
    stdout = capsys.readouterr().out
    assert stdout.count(SEPARATOR) == 3 and "the cat" in stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["the cat", "hello", "ab"]
    assert all(len(r["token_ids"]) == 10 and r["nfe"] >= 1 and r["strategy"] == "threshold" for r in rows)
    assert [c.text for c in done] == [r["text"] for r in rows]


def test_sample_cli_defaults_follow_the_model(mdlm_dir, ar_dir, capsys):
    done = sample_main(["--ckpt", str(mdlm_dir), "--start", "ab", "--num_samples", "3", "--no_progress"])
    assert len(done) == 3 and done[0].strategy == "ancestral"
    assert len(done[0].token_ids) <= 62  # default 500 new tokens, capped to the 64-token context
    assert "max_new_tokens = 62" in capsys.readouterr().err
    done = sample_main(["--ckpt", str(ar_dir), "--max_new_tokens", "5", "--num_samples", "2", "--no_progress"])
    assert done[0].strategy == "ar"  # default --start "\n"


def test_show_steps_prints_the_text_as_it_unmasks(mdlm_dir, capsys):
    sample_main(["--ckpt", str(mdlm_dir), "--start", "ab", "--num_samples", "1", "--max_new_tokens", "6",
                 "--strategy", "topk", "--tokens_per_step", "2", "--show_steps", "--no_stop_at_eot"])
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("[0]")]
    assert len(lines) == 3  # 6 tokens, 2 per step
    assert [l.count("░") for l in lines] == [4, 2, 0]


def test_start_from_file(mdlm_dir, tmp_path, capsys):
    f = tmp_path / "prompt.txt"
    f.write_text("hello there", encoding="utf-8")
    done = sample_main(["--ckpt", str(mdlm_dir), f"--start=FILE:{f}", "--num_samples", "1",
                        "--max_new_tokens", "4", "--no_progress"])
    assert done[0].prompt == "hello there"


def test_cli_errors_exit_with_a_message(mdlm_dir, ar_dir, capsys):
    cases = [(["--ckpt", str(ar_dir), "--strategy", "blocks"], "diffusion-only rule"),
             (["--ckpt", str(mdlm_dir), "--strategy", "ar"], "needs an autoregressive model"),
             (["--ckpt", str(mdlm_dir), "--steps", "0"], "steps must be an integer >= 1"),
             (["--ckpt", str(mdlm_dir), "--start", "a" * 70], "longer than the model's context"),
             ([], "give --ckpt DIR")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            sample_main(argv + ["--max_new_tokens", "4", "--no_progress"])
        assert e.value.code == 2
        assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------- bench
def test_bench_runs_on_random_models_and_says_quality_is_meaningless(tmp_path, capsys):
    out = tmp_path / "bench.json"
    result = bench_main(["--random_init", "--gen_length", "8", "--num_prompts", "2", "--batch_size", "2",
                         "--block_length", "4", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "MEANINGLESS" in printed and "one-token-per-step" in printed and "AR +KV cache" in printed
    data = json.loads(out.read_text())
    names = [r["name"] for r in data["rows"]]
    assert names[:2] == [RANDOM_BASELINE, CONFIDENCE_BASELINE] and len(names) == 13
    assert data["random_init"] is True
    by = {r["name"]: r for r in data["rows"]}
    assert by[RANDOM_BASELINE]["nfe_per_token"] == 1.0 and by[CONFIDENCE_BASELINE]["nfe_per_token"] == 1.0
    # the random diffusion model is block-causal (b = 4): 8 tokens after a prompt that ends mid-block span at
    # most 3 model blocks, and a 4-per-step rule takes one call per block
    assert by["top-k k=4"]["nfe_per_token"] == by["random order k=4"]["nfe_per_token"] <= 3 / 8
    assert by["top-k k=4"]["baseline"] == CONFIDENCE_BASELINE and by["random order k=4"]["baseline"] == RANDOM_BASELINE
    assert all(r["entropy"] is not None and r["gen_ppl_stderr"] is not None for r in data["rows"])
    assert by["blocks b=4 +KV cache"]["same_output"] is True  # random diffusion model is block-causal
    assert by["AR +KV cache"]["same_output"] is True
    assert set(result["targets"]) >= {"fewer_calls_same_quality", "kv_cache_blocks"}


def test_bench_target_compares_each_rule_with_its_own_family_baseline():
    """A confidence rule is held to the confidence-order baseline, a random-order rule to exact sampling;
    a rule passes only with >= 4x fewer calls AND a perplexity within 10% of its own baseline."""
    rows = [Row(RANDOM_BASELINE, "diffusion", "random", nfe_per_token=1.0, gen_ppl=100.0),
            Row(CONFIDENCE_BASELINE, "diffusion", "topk", nfe_per_token=1.0, gen_ppl=40.0),
            Row("random k=4", "diffusion", "random", nfe_per_token=0.25, gen_ppl=109.0, baseline=RANDOM_BASELINE),
            Row("top-k k=4", "diffusion", "topk", nfe_per_token=0.25, gen_ppl=60.0, baseline=CONFIDENCE_BASELINE),
            Row("blocks +KV cache", "diffusion", "blocks", {"kv_cache": True}, tokens_per_s=3.0, same_output=True,
                baseline=CONFIDENCE_BASELINE, nfe_per_token=1.0, gen_ppl=40.0),
            Row("blocks no cache", "diffusion", "blocks", {"kv_cache": False}, tokens_per_s=1.0,
                baseline=CONFIDENCE_BASELINE, nfe_per_token=1.0, gen_ppl=40.0)]
    for r in rows:
        r.calls_fewer_than_baseline = 1.0 / r.nfe_per_token
    t = check_targets(rows)
    verdict = {c["rule"]: c["meets"] for c in t["fewer_calls_same_quality"]["candidates"]}
    assert verdict == {"random k=4": True, "top-k k=4": False}  # 109 <= 110, but 60 > 44
    assert t["fewer_calls_same_quality"]["met"] and t["kv_cache_blocks"]["met"]
    rows[2].gen_ppl = 111.0  # now nothing is within 10% of its own baseline
    assert not check_targets(rows)["fewer_calls_same_quality"]["met"]


def test_bench_needs_a_model(capsys):
    with pytest.raises(SystemExit) as e:
        bench_main([])
    assert e.value.code == 2 and "--random_init" in capsys.readouterr().err


def test_inference_never_imports_deepspeed():
    """DESIGN.md: inference reads consolidated weights; DeepSpeed only ever runs in the export subprocess.
    Of training/ it imports only training.checkpointing.layout (which says what kind of directory a path is)
    and the safe loader that module reads RNG files with."""
    import subprocess
    import sys
    code = ("import sys, inference, inference.sample, bench.decoding, inference.loading\n"
            "allowed = {'training', 'training.checkpointing', 'training.checkpointing.layout', "
            "'training.checkpointing.safe_load'}\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('deepspeed', 'training') and m not in allowed)\n"
            "assert not bad, bad\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=str(loading.REPO_ROOT))
    assert proc.returncode == 0, proc.stderr


def test_bench_help_lists_its_knobs(capsys):
    with pytest.raises(SystemExit) as e:
        bench_main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--ckpt", "--ar", "--judge", "--random_init", "--gen_length", "--out", "--repeats"):
        assert flag in text
