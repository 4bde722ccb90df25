"""Bad input to inference/ gives a clear error, before any decoding starts."""
import json

import pytest
import torch

from inference.api import DecodeOptions, generate
from inference.loading import load_model
from inference.sample import main as sample_main
from inference.sample import read_prompts_file
from models.gpt import GPT, GPTConfig
from models.tokenizer import get_tokenizer
from models.weights import save_consolidated

TOK = get_tokenizer("char", corpus_text="abcdefghijklmnopqrstuvwxyz .,!?\n")


def tiny_model(attention="bidirectional", vocab_size=None):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=64, vocab_size=vocab_size or TOK.padded_vocab_size, n_layer=2, n_head=2,
                         n_embd=32, attention=attention)).eval()


def test_prompt_longer_than_the_context():
    with pytest.raises(ValueError, match="longer than the model's context"):
        generate(tiny_model(), TOK, ["a" * 64], 4)


def test_prompt_plus_new_tokens_longer_than_the_context():
    with pytest.raises(ValueError, match=r"exceeds the model's context.*lower max_new_tokens to 24"):
        generate(tiny_model(), TOK, ["a" * 40], 30, "topk")


def test_empty_prompt_list():
    with pytest.raises(ValueError, match="prompt list is empty"):
        generate(tiny_model(), TOK, [], 4)
    with pytest.raises(ValueError, match="list of strings"):
        generate(tiny_model(), TOK, "a bare string", 4)


@pytest.mark.parametrize("strategy", ["ancestral", "topk", "threshold", "blocks"])
@pytest.mark.parametrize("steps", [0, -3])
def test_steps_below_one(strategy, steps):
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        generate(tiny_model(), TOK, ["ab"], 4, strategy, steps=steps)


@pytest.mark.parametrize("knob", [dict(max_new_tokens=0), dict(tokens_per_step=0), dict(batch_size=0),
                                  dict(temperature=-1.0), dict(top_p=1.5), dict(top_k=0), dict(threshold=2.0),
                                  dict(block_length=0)])
def test_other_bad_knobs(knob):
    kw = {"max_new_tokens": 4, **knob}
    strategy = "threshold" if "threshold" in knob else "blocks" if "block_length" in knob else "topk"
    with pytest.raises(ValueError):
        generate(tiny_model(), TOK, ["ab"], strategy=strategy, **kw)


def test_checkpoint_of_another_vocab_than_the_tokenizer():
    gpt2 = get_tokenizer("gpt2")
    with pytest.raises(ValueError, match="does not match the tokenizer 'gpt2'"):
        generate(tiny_model(), gpt2, ["ab"], 4)
    with pytest.raises(ValueError, match="does not match the tokenizer 'char'"):
        generate(tiny_model(vocab_size=128), TOK, ["ab"], 4)


def test_checkpoint_whose_config_names_another_tokenizer(tmp_path):
    model = tiny_model()
    other = get_tokenizer("char", corpus_text="abc")  # 4 ids: its padded vocab (64) equals the model's
    info = {"model": model.config.to_dict(), "objective": {"name": "mdlm"}, "tokenizer": other.to_meta(),
            "mask_id": TOK.mask_id, "eot_id": TOK.eot_id}
    save_consolidated(model.state_dict(), info, tmp_path)
    with pytest.raises(ValueError, match="mask_id=33 but its tokenizer 'char' has 4"):
        load_model(ckpt=str(tmp_path), device="cpu")


def test_ar_checkpoint_given_a_diffusion_rule_and_the_reverse():
    for strategy in ("ancestral", "topk", "threshold", "blocks"):
        with pytest.raises(ValueError, match=f"{strategy!r} is a diffusion-only rule.*use strategy 'ar'"):
            generate(tiny_model("causal"), TOK, ["ab"], 4, strategy)
    with pytest.raises(ValueError, match="'ar' needs an autoregressive model"):
        generate(tiny_model("bidirectional"), TOK, ["ab"], 4, "ar")
    with pytest.raises(ValueError, match="unknown strategy"):
        generate(tiny_model(), TOK, ["ab"], 4, "beam")


def test_kv_cache_without_blocks_is_refused():
    from inference.commit_rules import CommitTopK
    from inference.confidence_rows import ConfidenceRows
    from inference.sampling import Sampler
    rows = ConfidenceRows(tiny_model(), TOK.mask_id, TOK.vocab_size, capacity=1, width=8)
    with pytest.raises(ValueError, match="kv_cache needs semi-autoregressive blocks"):
        rows.add([1, 2], 3, CommitTopK(tokens_per_step=1), Sampler(0.0), None, None, True)


def test_char_outside_the_vocabulary_is_a_clear_error():
    with pytest.raises(ValueError, match="not in the char vocabulary"):
        generate(tiny_model(), TOK, ["ABC"], 4)


def test_prompts_file_that_is_not_utf8(tmp_path, capsys):
    bad = tmp_path / "prompts.txt"
    bad.write_bytes("caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"not UTF-8 text: byte 0xe9 at offset 3"):
        read_prompts_file(bad)
    # the CLI turns it into an error message and exit status 2, before loading any model
    with pytest.raises(SystemExit) as e:
        sample_main(["--ckpt", str(tmp_path / "missing"), "--prompts_file", str(bad)])
    assert e.value.code == 2
    assert "not UTF-8" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sample_main(["--ckpt", str(tmp_path / "missing"), f"--start=FILE:{bad}"])
    assert "not UTF-8" in capsys.readouterr().err


def test_prompts_file_missing_or_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_prompts_file(tmp_path / "nope.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="holds no prompts"):
        read_prompts_file(empty)


def test_missing_or_foreign_checkpoint_dirs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(ckpt=str(tmp_path / "nope"))
    (tmp_path / "junk.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="neither consolidated weights"):
        load_model(ckpt=str(tmp_path))
    with pytest.raises(ValueError, match="exactly one of"):
        load_model()
    with pytest.raises(ValueError, match="expected one of gpt2"):
        load_model(init_from="gpt5")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="not a Hugging Face GPT-2 directory"):
        load_model(init_from=str(hf))


# ----------------------------------------------------------------------------- DecodeOptions on its own
@pytest.mark.parametrize("field,value,match", [
    ("strategy", "beam", "unknown strategy 'beam'; expected one of"), ("steps", 0, "steps must be an integer >= 1"),
    ("steps", "5", "steps must be an integer >= 1"), ("tokens_per_step", -1, "tokens_per_step must be an integer"),
    ("batch_size", 0, "batch_size must be"), ("block_length", 2.5, "block_length must be an integer >= 1"),
    ("block_rule", "best", "unknown block_rule 'best'; expected one of topk, random, threshold"),
    ("temperature", -1.0, "temperature must be >= 0"), ("temperature", "hot", "temperature must be a number"),
    ("top_k", 0, "top_k must be >= 1"), ("top_k", "5", "top_k must be an integer"), ("top_p", 1.5, "top_p must be in"),
    ("kv_cache", "false", "kv_cache must be true or false"), ("stop_at_eot", 1, "stop_at_eot must be true or false"),
    ("seed", "x", "seed must be an integer"), ("schedule", "sqrt", "unknown noise schedule 'sqrt'")])
def test_decode_options_name_the_bad_field(field, value, match):
    """A server validates a request body with DecodeOptions alone, before any model is involved."""
    with pytest.raises(ValueError, match=match):
        DecodeOptions.from_dict({field: value})


def test_decode_options_threshold_is_checked_where_a_rule_uses_it():
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\], got 2.0"):
        DecodeOptions(strategy="threshold", threshold=2.0)
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\]"):
        DecodeOptions(strategy="blocks", block_rule="threshold", threshold=-0.5)
    DecodeOptions(strategy="topk", threshold=2.0)  # unused by topk: accepted, as before


def test_decode_options_from_dict():
    assert DecodeOptions.from_dict({}) == DecodeOptions()
    assert DecodeOptions.from_dict(DecodeOptions(strategy="topk", steps=4).to_dict()).steps == 4
    with pytest.raises(ValueError, match=r"unknown decoding option\(s\) 'temp'; known options: strategy, steps"):
        DecodeOptions.from_dict({"temp": 0.5})
    with pytest.raises(ValueError, match="give steps or tokens_per_step, not both"):
        DecodeOptions.from_dict({"steps": 4, "tokens_per_step": 2})
    with pytest.raises(ValueError, match="must be an object"):
        DecodeOptions.from_dict(["topk"])


def test_decode_options_for_model():
    assert DecodeOptions().for_model(tiny_model()).strategy == "ancestral"
    assert DecodeOptions().for_model(tiny_model("causal")).strategy == "ar"
    assert DecodeOptions(strategy="blocks").for_model(tiny_model()).block_length == 32
    with pytest.raises(ValueError, match="diffusion-only rule"):
        DecodeOptions(strategy="topk").for_model(tiny_model("causal"))


def test_unknown_knob_is_a_type_error_as_for_any_keyword():
    with pytest.raises(TypeError, match="temp"):
        generate(tiny_model(), TOK, ["ab"], 4, temp=0.5)


def test_cli_defaults_are_the_decode_options_defaults():
    from inference.sample import parse_args
    assert parse_args([]).decode_options() == DecodeOptions()
