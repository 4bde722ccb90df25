"""Specification of the consolidated weight format (model.safetensors + config.json)."""
import json

import pytest
import torch

from models.gpt import GPT, GPTConfig
from models.weights import load_consolidated, read_info, save_consolidated


def saved_model(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=16, attention="bidirectional"))
    save_consolidated(model.state_dict(), {"model": model.config.to_dict(), "mask_id": 63}, tmp_path)
    return model


def test_save_then_load_gives_identical_logits(tmp_path):
    model = saved_model(tmp_path)
    loaded, info = load_consolidated(tmp_path)
    x = torch.randint(0, 63, (2, 16))
    assert torch.equal(model(x), loaded(x))
    assert info["mask_id"] == 63 and loaded.config == model.config
    # the tied output matrix is stored once and tied again on load
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    assert not list(tmp_path.glob("*.tmp"))  # no temporary files left behind


def test_missing_directory_names_the_export_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m training.export"):
        read_info(tmp_path / "nope")


def test_truncated_weights_are_a_clear_error(tmp_path):
    saved_model(tmp_path)
    w = tmp_path / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt"):
        load_consolidated(tmp_path)


def test_corrupt_config_is_a_clear_error(tmp_path):
    saved_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_info(tmp_path)


def test_weights_that_disagree_with_config_are_rejected(tmp_path):
    saved_model(tmp_path)
    info = json.loads((tmp_path / "config.json").read_text())
    info["model"]["n_layer"] = 2
    (tmp_path / "config.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="do not match config.json"):
        load_consolidated(tmp_path)
