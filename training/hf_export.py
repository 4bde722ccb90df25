"""Export an AR model to Hugging Face `GPT2LMHeadModel` format, for `transformers` and lm-eval-harness.

    python -m training.hf_export --model out/gpt2/export --out hf/gpt2-owt
    python -c "from transformers import pipeline; print(pipeline('text-generation', 'hf/gpt2-owt')('Hello'))"
    lm_eval --model hf --model_args pretrained=hf/gpt2-owt --tasks hellaswag

Only models with GPT-2's learned position embeddings (pos_emb="learned", the default) are exported: a
rope model has no GPT2LMHeadModel equivalent and is refused.

Our GPT is GPT-2's network with two differences the export undoes:
  * the embedding is padded (GPT-2 BPE: 50257 real ids + MASK + padding = 50304 rows). Only the
    tokenizer's real ids are exported, so the HF model has GPT-2's 50257-row vocabulary and its logits are
    ours restricted to real tokens (an AR model never predicts MASK or padding; they are not text).
  * OpenAI's checkpoints (and so HF's GPT2) store the four matmuls of a block in a Conv1D module whose
    weight is the transpose of nn.Linear's: c_attn, attn.c_proj, mlp.c_fc and mlp.c_proj are transposed.
`GPT.from_pretrained(HF_DIR)` reads the result back (the round trip the tests check).
For the GPT-2 tokenizer the HF tokenizer files are written too (from the offline BPE files), so the
directory is complete; a char-tokenizer model gets `diffusiongpt_tokenizer.json` to decode with instead.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: find the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import parse_cli
from models.weights import load_consolidated

CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def real_vocab_size(info: dict, model_vocab: int) -> int:
    tok = info.get("tokenizer")
    if isinstance(tok, dict) and tok.get("vocab_size"):
        return int(tok["vocab_size"])
    if info.get("mask_id") is not None:  # docs/design.md: mask id = the tokenizer's vocabulary size
        return int(info["mask_id"])
    print(f"warning: no tokenizer recorded; exporting all {model_vocab} embedding rows", file=sys.stderr)
    return model_vocab


def to_hf_state_dict(model, vocab_size: int) -> dict:
    """Our GPT state dict -> GPT2LMHeadModel's: vocab rows cut to vocab_size, Conv1D weights transposed,
    zero biases where the model was trained without them (GPT-2 always has them)."""
    sd = {k: v.detach().cpu().float() for k, v in model.state_dict().items()}
    out = {}
    for k, v in sd.items():
        if k == "lm_head.weight":
            continue  # tied to wte; HF ties it again on load
        if k == "transformer.wte.weight":
            v = v[:vocab_size]
        elif k.endswith(CONV1D_WEIGHTS):
            v = v.t()
        out[k] = v.contiguous()
    if not model.config.bias:  # LayerNorm and Linear biases are zero in a bias-free model
        for k, v in list(out.items()):
            if k.endswith(".weight") and k not in ("transformer.wte.weight", "transformer.wpe.weight"):
                b = k[: -len("weight")] + "bias"
                out[b] = torch.zeros(v.shape[1] if k.endswith(CONV1D_WEIGHTS) else v.shape[0])
    return out


def hf_config(model, vocab_size: int, eot_id):
    from transformers import GPT2Config

    c = model.config
    return GPT2Config(vocab_size=vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                      n_head=c.n_head, n_inner=4 * c.n_embd, activation_function="gelu_new",  # tanh GELU
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
                      bos_token_id=eot_id, eos_token_id=eot_id, tie_word_embeddings=True)


def write_tokenizer(info: dict, out: Path) -> str:
    """HF tokenizer files for GPT-2 BPE; the char vocabulary has no HF tokenizer, so record it instead."""
    tok = info.get("tokenizer") or {}
    name = tok.get("tokenizer", tok.get("name")) if isinstance(tok, dict) else tok
    if name == "gpt2":
        from transformers import GPT2TokenizerFast
        from models.tokenizer import _gpt2_bpe_dir, offline_gpt2_encoding

        offline_gpt2_encoding()  # verifies the sha256 of the BPE files: the ids must be OpenAI's
        d = _gpt2_bpe_dir()
        hf_tok = GPT2TokenizerFast(vocab=str(d / "encoder.json"), merges=str(d / "vocab.bpe"))
        hf_tok.save_pretrained(str(out))
        return "gpt2 (GPT2TokenizerFast)"
    (out / "diffusiongpt_tokenizer.json").write_text(json.dumps(tok, indent=2, ensure_ascii=False) + "\n")
    return f"{name} (no HF tokenizer; see diffusiongpt_tokenizer.json and models.tokenizer.tokenizer_from_meta)"


def export_to_hf(model_dir, out_dir, with_tokenizer: bool = True) -> Path:
    """Write GPT2LMHeadModel.save_pretrained files for the AR model in model_dir -> out_dir."""
    from transformers import GPT2LMHeadModel, GenerationConfig

    model, info = load_consolidated(model_dir)
    objective = (info.get("objective") or {}).get("name", "ar")
    if model.config.attention != "causal" or objective != "ar":
        shifted = ("It is shifted (config.shift: token i predicted from position i - 1, as in GPT-2), but it is "
                   "still a diffusion model: its weights under a causal mask are not the model it was trained "
                   "as, so it is not exported as one. " if model.config.shift else "")
        raise ValueError(f"{model_dir} is a {objective} model with {model.config.attention} attention; only AR "
                         f"(causal) models are GPT-2 models. {shifted}A diffusion model has no GPT2LMHeadModel "
                         f"equivalent.")
    if model.config.pos_emb != "learned":
        raise ValueError(f"{model_dir} uses pos_emb={model.config.pos_emb!r} (rotary position embeddings); "
                         f"GPT2LMHeadModel has learned position embeddings (wpe) only, so there is no GPT-2 "
                         f"equivalent. Train with --model.pos_emb=learned to export to Hugging Face.")
    vocab = real_vocab_size(info, model.config.vocab_size)
    if vocab > model.config.vocab_size:
        raise ValueError(f"tokenizer has {vocab} ids but the model only {model.config.vocab_size} rows")
    eot_id = info.get("eot_id")
    hf = GPT2LMHeadModel(hf_config(model, vocab, eot_id)).eval()
    sd = to_hf_state_dict(model, vocab)
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" and not k.endswith((".attn.bias", ".attn.masked_bias"))]
    if missing or unexpected:
        raise RuntimeError(f"state dict does not fit GPT2LMHeadModel: missing {missing[:5]}, unexpected {unexpected[:5]}")
    hf.tie_weights()
    hf.generation_config = GenerationConfig(bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=eot_id)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out))
    tok_note = write_tokenizer(info, out) if with_tokenizer else "not written"
    print(f"wrote {out}: GPT2LMHeadModel ({vocab} vocab, {model.config.n_layer} layers, "
          f"{model.config.n_embd} wide, context {model.config.block_size}); tokenizer: {tok_note}")
    return out


@dataclass
class HFExportConfig:
    model: str = field(metadata={"help": "consolidated model dir (a training run's OUT/export, or the run's OUT)"})
    out: str = field(metadata={"help": "directory for the Hugging Face files"})
    tokenizer: bool = field(default=True, metadata={"help": "write the tokenizer files (GPT-2 BPE; a char tokenizer gets diffusiongpt_tokenizer.json)"})
    overwrite: bool = field(default=False, metadata={"help": "replace a model already in --out (without it, a --out "
                                                             "holding config.json or weights is refused)"})


MODEL_FILES = ("config.json", "model.safetensors", "pytorch_model.bin")  # what save_pretrained would replace


def check_no_model_in_out(model_dir: Path, out: Path, overwrite: bool) -> None:
    """ValueError when writing to `out` would replace a model: the one being converted (always), or another
    one (unless overwrite)."""
    if out.resolve() == model_dir.resolve():
        raise ValueError(f"--out {out} is the model being converted: its config.json and weights would be replaced "
                         f"by the Hugging Face ones; give another --out")
    held = [name for name in MODEL_FILES if (out / name).exists()]
    if held and not overwrite:
        raise ValueError(f"--out {out} already holds a model ({', '.join(held)}); write elsewhere (--out NEW_DIR) "
                         f"or replace it (--overwrite)")


def main(argv=None) -> Path:
    args = parse_cli(HFExportConfig, argv, prog="python -m training.hf_export", description=__doc__.split("\n\n")[0])
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file() and (model_dir / "export" / "config.json").is_file():
        model_dir = model_dir / "export"  # a training out dir
    try:
        check_no_model_in_out(model_dir, Path(args.out), args.overwrite)
        return export_to_hf(model_dir, args.out, with_tokenizer=args.tokenizer)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
