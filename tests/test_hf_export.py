"""Specification of the Hugging Face export (training/hf_export.py): GPT2LMHeadModel with the same logits."""
import json

import pytest
import torch

from models.gpt import GPT, GPTConfig
from models.tokenizer import get_tokenizer
from models.weights import save_consolidated
from training.hf_export import export_to_hf, main

GPT2_ROWS = 50304  # GPT-2's 50257 ids + MASK, padded to a multiple of 64


def saved_ar_model(d, bias=True, attention="causal", objective="ar", seed=0, pos_emb="learned"):
    """A tiny GPT-2-vocabulary model in the consolidated format, as training/export.py writes it."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=32, vocab_size=GPT2_ROWS, n_layer=2, n_head=2, n_embd=32, bias=bias,
                          attention=attention, pos_emb=pos_emb)).eval()
    with torch.no_grad():  # non-zero biases and LayerNorm parameters, so a missed copy cannot hide
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.normal_(0, 0.1)
    tok = get_tokenizer("gpt2")
    save_consolidated(model.state_dict(), {"model": model.config.to_dict(), "objective": {"name": objective},
                                           "tokenizer": tok.to_meta(), "mask_id": tok.mask_id,
                                           "eot_id": tok.eot_id}, d)
    return model


@pytest.mark.parametrize("bias", [True, False])
def test_round_trip_gives_the_same_logits(tmp_path, bias):
    from transformers import GPT2LMHeadModel

    model = saved_ar_model(tmp_path / "model", bias=bias)
    export_to_hf(tmp_path / "model", tmp_path / "hf")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.vocab_size == 50257  # padding and MASK rows are not text: they are dropped
    x = torch.randint(0, 50257, (2, 32))
    with torch.no_grad():
        ours = model(x)[..., :50257]  # (B, T, 50257)
        theirs = hf(x).logits
        back = GPT.from_pretrained(str(tmp_path / "hf")).eval()(x)  # and read back through our loader
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(back, ours, rtol=1e-5, atol=1e-5)


def test_export_writes_a_matching_gpt2_tokenizer_and_generates(tmp_path):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    saved_ar_model(tmp_path / "model")
    export_to_hf(tmp_path / "model", tmp_path / "hf")
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "Hello world, it's diffusionGPT.\n"
    assert hf_tok.encode(text) == get_tokenizer("gpt2").encode(text)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    out = hf.generate(torch.tensor([hf_tok.encode("Hello")]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 5)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == 50256


def test_cli_accepts_a_training_out_dir(tmp_path):
    saved_ar_model(tmp_path / "run" / "export")
    assert main(["--model", str(tmp_path / "run"), "--out", str(tmp_path / "hf"), "--no_tokenizer"]) == tmp_path / "hf"
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_diffusion_model_is_refused(tmp_path, capsys):
    saved_ar_model(tmp_path / "mdlm", attention="bidirectional", objective="mdlm")
    with pytest.raises(ValueError, match="only AR"):
        export_to_hf(tmp_path / "mdlm", tmp_path / "hf")
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path / "mdlm"), "--out", str(tmp_path / "hf")])
    assert "only AR" in capsys.readouterr().err


def test_rope_model_is_refused(tmp_path, capsys):
    """GPT2LMHeadModel only has a learned position table: a rope model has no faithful export."""
    saved_ar_model(tmp_path / "rope", pos_emb="rope")
    with pytest.raises(ValueError, match="GPT2LMHeadModel has learned position embeddings"):
        export_to_hf(tmp_path / "rope", tmp_path / "hf")
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path / "rope"), "--out", str(tmp_path / "hf")])
    assert "rotary" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_a_model_in_out_is_kept_unless_overwrite_and_the_source_never_replaced(tmp_path, capsys):
    saved_ar_model(tmp_path / "model")
    source = {p.name: p.read_bytes() for p in (tmp_path / "model").iterdir()}
    for flags in ([], ["--overwrite"]):  # the model being converted is never written over
        with pytest.raises(SystemExit) as e:
            main(["--model", str(tmp_path / "model"), "--out", str(tmp_path / "model"), *flags])
        assert e.value.code == 2 and "is the model being converted" in capsys.readouterr().err
    main(["--model", str(tmp_path / "model"), "--out", str(tmp_path / "hf")])
    hf_files = {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()}
    with pytest.raises(SystemExit) as e:
        main(["--model", str(tmp_path / "model"), "--out", str(tmp_path / "hf")])
    assert e.value.code == 2 and "already holds a model (config.json, model.safetensors)" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()} == hf_files
    main(["--model", str(tmp_path / "model"), "--out", str(tmp_path / "hf"), "--overwrite"])
    assert {p.name: p.read_bytes() for p in (tmp_path / "model").iterdir()} == source
