"""Tiny consolidated models on disk for the tests of loading, sampling and serving (random weights: the
tests check plumbing and equalities, never quality)."""
from pathlib import Path

import torch

from models.gpt import GPT, GPTConfig
from models.tokenizer import get_tokenizer
from models.weights import save_consolidated

TOK = get_tokenizer("char", corpus_text="abcdefghijklmnopqrstuvwxyz .,!?\n")


def export_tiny(out_dir, attention="bidirectional", objective="mdlm", block_length=0) -> Path:
    """A 2-layer, 32-dim model with a 64-token context, seeded, saved as our consolidated export."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=TOK.padded_vocab_size, n_layer=2, n_head=2, n_embd=32,
                          attention=attention, block_length=block_length))
    info = {"model": model.config.to_dict(), "objective": {"name": objective, "schedule": "loglinear"},
            "tokenizer": TOK.to_meta(), "mask_id": TOK.mask_id, "eot_id": TOK.eot_id}
    save_consolidated(model.state_dict(), info, out_dir)
    return Path(out_dir)
