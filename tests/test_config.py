"""The config loader every command uses (common/config.py): a typed dataclass < a JSON/TOML file < flags."""
import importlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest

from common.config import ConfigError, build, help_text, load, parse_cli, read_config_file

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Inner:
    width: int = 4  # how wide, from the trailing comment
    kind: str = field(default="a", metadata={"help": "which kind", "choices": ("a", "b")})


@dataclass
class Demo:
    name: str = field(metadata={"help": "required: no default"})
    steps: int = field(default=10, metadata={"help": "how many steps"})
    rate: float = 0.5
    fast: bool = field(default=False, metadata={"help": "go fast"})
    cache: bool = field(default=True, metadata={"help": "keep a cache"})
    top_p: Optional[float] = None
    sizes: list[int] = field(default_factory=lambda: [1, 2], metadata={"help": "sizes to try"})
    inner: Inner = field(default_factory=lambda: Inner(width=8), metadata={"help": "the nested part"})


def cfg_of(*argv, **kw) -> Demo:
    return load(Demo, ["--name=x", *argv], **kw).config


# ----------------------------------------------------------------------------- flags
def test_flags_convert_to_each_fields_type():
    c = cfg_of("--steps", "3", "--rate=2", "--top_p", "0.9", "--sizes=4,5")
    assert (c.steps, c.rate, c.top_p, c.sizes) == (3, 2.0, 0.9, [4, 5])
    assert isinstance(c.rate, float) and cfg_of("--top_p=none").top_p is None


def test_both_spellings_key_equals_value_and_key_space_value():
    assert cfg_of("--steps=3") == cfg_of("--steps", "3")
    assert cfg_of("--steps", "-4").steps == -4  # a negative number is a value, not a flag


def test_bool_flags_bare_negated_or_with_a_value():
    assert cfg_of("--fast").fast is True
    assert cfg_of("--no_cache").cache is False and cfg_of("--no-cache").cache is False
    assert cfg_of("--cache=false").cache is False and cfg_of("--cache", "0").cache is False
    assert cfg_of("--fast", "--steps", "2").fast is True  # a bare flag does not eat the next flag
    with pytest.raises(ConfigError, match="--fast: expected true/false, got 'maybe'"):
        cfg_of("--fast=maybe")


def test_list_flags_take_commas_several_values_or_repeats():
    assert cfg_of("--sizes", "4", "5", "--steps", "1").sizes == [4, 5]
    assert cfg_of("--sizes", "4", "--sizes", "5,6").sizes == [4, 5, 6]
    assert cfg_of("--sizes=").sizes == []


def test_nested_keys_are_dotted_and_keep_the_parents_defaults():
    c = cfg_of("--inner.kind=b")
    assert c.inner == Inner(width=8, kind="b")  # width keeps Demo's default for inner (8), not Inner's (4)


def test_dashes_in_flag_names_read_as_underscores():
    @dataclass
    class Bench:
        seq_lens: list[int] = field(default_factory=lambda: [512])
        flex: bool = True
    c = load(Bench, ["--seq-lens", "64", "128", "--no-flex"]).config
    assert c.seq_lens == [64, 128] and c.flex is False


def test_values_that_do_not_convert_or_are_not_a_choice_are_errors():
    with pytest.raises(ConfigError, match="--steps: expected int, got 'many'"):
        cfg_of("--steps=many")
    with pytest.raises(ConfigError, match="--inner.kind='c': expected one of a | b"):
        cfg_of("--inner.kind=c")
    with pytest.raises(ConfigError, match="--steps needs a value"):
        cfg_of("--steps")


def test_unknown_key_is_an_error_listing_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown config key --step; known keys: name, steps, .*inner\.width"):
        cfg_of("--step=3")
    with pytest.raises(ConfigError, match="unexpected argument 'stray'"):
        cfg_of("stray")


def test_a_field_without_a_default_is_required():
    with pytest.raises(ConfigError, match="--name is required"):
        load(Demo, [])


def test_aliases_and_unknown_flags_left_for_someone_else():
    c = load(Demo, ["--name=x", "--kind=b"], aliases={"kind": "inner.kind"}).config
    assert c.inner.kind == "b"
    loaded = load(Demo, ["--name=x", "--model.n_layer", "4", "--steps=2", "--other=1"], allow_unknown=True)
    assert loaded.config.steps == 2 and loaded.rest == ["--model.n_layer", "4", "--other=1"]


# ----------------------------------------------------------------------------- files and precedence
@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_file_below_flags_and_base_below_file(tmp_path, suffix):
    path = tmp_path / f"c{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps({"_comment": "ignored", "name": "file", "steps": 7, "rate": 1,
                                    "inner": {"kind": "b"}}))
    else:
        path.write_text('_comment = "ignored"\nname = "file"\nsteps = 7\nrate = 1\n[inner]\nkind = "b"\n')
    c, explicit, _ = load(Demo, ["--config", str(path), "--steps=9"], base={"rate": 0.1, "top_p": 0.5})
    assert (c.name, c.steps, c.rate, c.top_p, c.inner.kind) == ("file", 9, 1.0, 0.5, "b")  # flag > file > base
    assert explicit == {"name", "steps", "rate", "top_p", "inner.kind"}  # what a default did not decide
    assert load(Demo, ["--name=x"], config_file=path).config.steps == 7  # the file given by the caller


def test_file_values_must_already_have_the_fields_type(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"name": "x", "steps": "7"}))
    with pytest.raises(ConfigError, match="config key steps: expected int, got '7'"):
        load(Demo, [], config_file=path)
    with pytest.raises(ConfigError, match="config key fast: expected true/false, got 1"):
        build(Demo, {"name": "x", "fast": 1})
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['inner.height'\] in Inner"):
        build(Demo, {"name": "x", "inner": {"height": 1}})


def test_config_file_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_config_file(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json is not valid JSON"):
        read_config_file(tmp_path / "bad.json")


# ----------------------------------------------------------------------------- help and the CLI
def test_help_lists_every_key_with_its_default_and_help():
    text = help_text(Demo)
    for line in ("--name (required)", "--steps=10", "how many steps", "--top_p=none", "--sizes=1,2",
                 "--inner.*   the nested part", "--inner.width=8", "how wide, from the trailing comment",
                 "(one of: a | b)", "(--no_cache: false)"):
        assert line in text


def test_parse_cli_prints_help_and_exits_0_and_exits_2_on_a_mistake(capsys):
    with pytest.raises(SystemExit) as e:
        parse_cli(Demo, ["--help"], prog="demo", description="A demo.")
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: demo") and "A demo." in out and "--steps=10" in out
    with pytest.raises(SystemExit) as e:
        parse_cli(Demo, ["--name=x", "--steps=x"], prog="demo")
    assert e.value.code == 2 and "demo: error: --steps: expected int" in capsys.readouterr().err


# ----------------------------------------------------------------------------- every command uses it
IN_PROCESS = [("inference.sample", "--max_new_tokens", "tokens to generate per sample"),
              ("evaluation.evaluate", "--samples_per_window", "Monte-Carlo samples"),
              ("evaluation.study", "--quick", "the CI size"),
              ("evaluation.generative_quality", "--judge", "AR model dir"),
              ("bench.decoding", "--random_init", "tiny random"),
              ("bench.attention_bench", "--seq_lens", "sequence lengths"),
              ("training.prepare", "--tokenizer", "GPT-2 BPE"),
              ("training.export", "--ckpt", "ckpt/step_N"),
              ("training.hf_export", "--tokenizer", "tokenizer files"),
              ("inference.serve", "--max_rows", "rows (decodes) per model call"),
              ("bench.serve_load", "--concurrency", "client concurrency levels"),
              ("training.pretrain", "--deepspeed_config", "model.n_layer")]  # imports DeepSpeed, sets nothing
SUBPROCESS = [("bench.training", "--rounds", "model.n_layer")]  # sets rank variables on import


@pytest.mark.parametrize("module, flag, help_words", IN_PROCESS + SUBPROCESS,
                         ids=[m for m, _, _ in IN_PROCESS + SUBPROCESS])
def test_every_command_has_help_from_its_config_fields(module, flag, help_words, capsys):
    if (module, flag, help_words) in SUBPROCESS:
        cmd = [sys.executable, module] if module.endswith(".py") else [sys.executable, "-m", module]
        env = {**os.environ, "DS_ACCELERATOR": "cpu"}
        proc = subprocess.run([*cmd, "--help"], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
        code, out = proc.returncode, proc.stdout
    else:
        main = importlib.import_module(module).main
        capsys.readouterr()  # what importing printed (DeepSpeed says which accelerator it found) is no help
        with pytest.raises(SystemExit) as e:
            main(["--help"])
        code, out = e.value.code, capsys.readouterr().out
    assert code == 0
    assert out.startswith("usage:") and flag in out and help_words in out


# commands with a positional argument or none, on argparse: --help answers and nothing else happens
PLAIN_COMMANDS = ["training.run_lock", "training.cpu_comm_op", "evaluation.tasks.shakespeare.build"]


@pytest.mark.parametrize("module", PLAIN_COMMANDS)
def test_every_plain_command_answers_help_and_does_nothing_else(module, capsys):
    task_data = sorted((REPO / "evaluation/tasks/shakespeare/data").glob("*.jsonl"))
    before = {p: p.stat().st_mtime_ns for p in task_data}
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith(f"usage: python -m {module}")
    assert {p: p.stat().st_mtime_ns for p in task_data} == before  # the task files were not rebuilt


def test_run_lock_answers_0_for_a_free_out_dir(tmp_path):
    from training import run_lock

    assert run_lock.main([str(tmp_path / "never_used")]) == 0
