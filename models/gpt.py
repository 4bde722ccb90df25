"""The one Transformer backbone of diffusionGPT, read top to bottom like nanoGPT's model.py.

AR (GPT) and masked-diffusion (MDLM) models are this same network; they differ only in the attention
mask (`GPTConfig.attention`) and in the loss, which lives beside it in models/diffusion.py.
Parameter names and layout follow OpenAI's GPT-2 so its checkpoints load (see `from_pretrained`).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from torch.nn import functional as F

from kernels.attention import AttentionMask, attention

ATTENTION_KINDS = ("causal", "bidirectional", "block_causal")
ATTENTION_IMPLS = ("auto", "triton", "torch")
POS_EMBS = ("learned", "rope")
GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # OpenAI's checkpoints GPT.from_pretrained loads by name

# A KV cache is a list with one (k, v) pair per layer, each (B, n_head, T_past, head_dim).
KVCache = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class GPTConfig:
    # context length in tokens (number of positions). nanoGPT's name, kept because its users know it;
    # everywhere else "block" is the diffusion block, `block_length`
    block_size: int = 1024
    vocab_size: int = 50304  # embedding rows: GPT-2's 50257 ids + MASK (50257), padded to a multiple of 64
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # residual/embedding dropout; attention dropout is not implemented (fused kernels)
    bias: bool = True  # biases in Linears and LayerNorms, like GPT-2
    attention: str = "causal"  # causal (AR) | bidirectional (MDLM) | block_causal (block diffusion)
    block_length: int = 0  # diffusion block b (tokens) for attention="block_causal" (BD3-LM)
    attn_impl: str = "auto"  # auto (Triton on GPU, PyTorch elsewhere) | triton | torch
    pos_emb: str = "learned"  # learned (GPT-2's wpe table) | rope (rotary q/k, as in LLaMA and MDLM; no wpe)
    # diffusion models only: the output at position i predicts the token at i + 1, as an AR model's does
    # (DiffuGPT), so a model adapted from an AR checkpoint keeps the meaning of its head. Position 0 is then
    # never predicted: a shifted model is always conditioned on at least one clean first token.
    shift: bool = False

    def __post_init__(self):
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"GPTConfig.attention={self.attention!r}: expected one of {ATTENTION_KINDS}")
        if self.attn_impl not in ATTENTION_IMPLS:
            raise ValueError(f"GPTConfig.attn_impl={self.attn_impl!r}: expected one of {ATTENTION_IMPLS}")
        if self.pos_emb not in POS_EMBS:
            raise ValueError(f"GPTConfig.pos_emb={self.pos_emb!r}: expected one of {POS_EMBS}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.pos_emb == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"pos_emb='rope' rotates feature pairs: head size n_embd/n_head="
                             f"{self.n_embd // self.n_head} must be even")
        if self.attention == "block_causal" and self.block_length < 1:
            raise ValueError("attention='block_causal' needs block_length >= 1")
        if self.shift and self.attention == "causal":
            raise ValueError("shift=True is for diffusion models (bidirectional / block_causal attention): an AR "
                             "model's output already predicts the next token; drop --model.shift")

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    def default_mask(self, q_offset: int = 0) -> AttentionMask:
        return AttentionMask(kind=self.attention, block_length=self.block_length, q_offset=q_offset)

    # ---- facts about the model that decoding, serving and evaluation ask (derived, not stored)
    @property
    def kind(self) -> str:
        """'ar' for causal attention, 'diffusion' for bidirectional (MDLM) and block-causal (BD3-LM)."""
        return "ar" if self.attention == "causal" else "diffusion"

    @property
    def needs_first_token(self) -> bool:
        """AR and shifted diffusion models predict each token from the position before it, so nothing
        predicts a sequence's first token: an empty prompt starts from EOT, like GPT-2's documents."""
        return self.kind == "ar" or self.shift

    @property
    def block_alignment(self) -> int:
        """The diffusion block every decode must respect: block_length for block-causal models, else 0."""
        return self.block_length if self.attention == "block_causal" else 0

    @property
    def exact_cache(self) -> bool:
        """Whether a KV cache changes nothing: causal (AR) and block-causal (BD3-LM) models never let a
        finished token see a later one, so its keys/values are final. A bidirectional model's prefix cache
        (Fast-dLLM, decoding block by block) is an approximation: the prefix would see the later blocks."""
        return self.attention in ("causal", "block_causal")


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1's `bias` arg in all paths)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class RotaryEmbedding(nn.Module):
    """Rotary position embeddings (RoFormer, Su et al. 2021; LLaMA, MDLM), for pos_emb="rope".

    Nothing is added to the residual stream; instead each query and key is rotated by its position:
    feature pair (i, i + hs/2) turns by the angle pos * base^(-2i/hs). Rotations compose, so the score of
    a query at m and a key at n is q . R(n - m) k: it depends on the offset n - m only.
    cos/sin are precomputed for block_size positions as non-persistent buffers (not in checkpoints)."""

    def __init__(self, head_dim: int, max_positions: int, base: float = 10000.0):
        super().__init__()
        self.head_dim, self.max_positions, self.base = head_dim, max_positions, base
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self._build(torch.device("cpu"))

    def _build(self, device):
        inv_freq = self.base ** (-torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim)
        angles = torch.outer(torch.arange(self.max_positions, dtype=torch.float32, device=device), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)  # (block_size, hs): pair (i, i + hs/2) shares an angle
        self.cos, self.sin = angles.cos(), angles.sin()

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if self.cos.dtype != torch.float32:  # .bfloat16()/.half() rounded the table: rebuild it in fp32
            self._build(self.cos.device)
        return self

    def forward(self, positions: torch.Tensor):
        """positions (T,) or (B, T) -> cos, sin of shape (1, T, hs) or (B, 1, T, hs), fp32, which
        broadcast against q and k (B, n_head, T, hs)."""
        return self.cos[positions].unsqueeze(-3), self.sin[positions].unsqueeze(-3)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each feature pair (x_i, x_{i + hs/2}) of x (B, n_head, T, hs) by its angle (in fp32)."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.attn_impl = config.attn_impl
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, mask: AttentionMask, past_kv: Optional[tuple] = None, rope: Optional[tuple] = None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        if rope is not None:  # (cos, sin) of these tokens' positions; rotate before k enters the cache
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        present = (k, v)  # this call's keys/values, for the caller's KV cache
        if past_kv is not None:
            k = torch.cat([past_kv[0], k], dim=2)  # (B, nh, T_past + T, hs)
            v = torch.cat([past_kv[1], v], dim=2)
        # every attention in the project goes through this one call (Triton on GPU, PyTorch elsewhere)
        y = attention(q, k, v, mask, impl=self.attn_impl)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads side by side
        return self.resid_dropout(self.c_proj(y)), present


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        # GPT-2 uses the tanh approximation of GELU; the exact one would not reproduce its logits
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class TransformerLayer(nn.Module):
    """One layer of the stack (`transformer.h[i]`): attention then MLP, each with a pre-LayerNorm and a
    residual. (nanoGPT calls it Block; here a block is the diffusion block, `block_length`.)"""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = SelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, mask: AttentionMask, past_kv=None, rope=None):
        a, present = self.attn(self.ln_1(x), mask, past_kv, rope)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, present


def is_hf_gpt2_dir(path) -> bool:
    """Whether `path` is a Hugging Face GPT-2 directory (config.json with model_type "gpt2")."""
    cfg = Path(path) / "config.json"
    try:
        return cfg.is_file() and json.loads(cfg.read_text()).get("model_type") == "gpt2"
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


# GPT2Config settings this network reproduces: anything else would load silently with other logits
GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # all three are GELU's tanh approximation
LAYER_NORM_EPS = 1e-5  # LayerNorm.forward


def _check_reproducible_gpt2(name, hc, hf) -> None:
    """ValueError naming the first GPT2Config setting this network does not implement."""
    problems = []
    if hc.activation_function not in GPT2_ACTIVATIONS:
        problems.append(f"activation_function={hc.activation_function!r} (this network uses GELU's tanh "
                        f"approximation: {' | '.join(GPT2_ACTIVATIONS)})")
    if not math.isclose(hc.layer_norm_epsilon, LAYER_NORM_EPS, rel_tol=1e-6):
        problems.append(f"layer_norm_epsilon={hc.layer_norm_epsilon} (this network uses {LAYER_NORM_EPS})")
    if not hc.scale_attn_weights:
        problems.append("scale_attn_weights=False (this network scales attention scores by 1/sqrt(head size))")
    if hc.scale_attn_by_inverse_layer_idx:
        problems.append("scale_attn_by_inverse_layer_idx=True (this network does not scale scores by layer)")
    if hc.n_inner not in (None, 4 * hc.n_embd):
        problems.append(f"n_inner={hc.n_inner} (this network's MLP is 4 x n_embd = {4 * hc.n_embd} wide)")
    if getattr(hc, "add_cross_attention", False):
        problems.append("add_cross_attention=True (this network has no cross-attention)")
    head, wte = hf.lm_head.weight, hf.transformer.wte.weight
    if not getattr(hc, "tie_word_embeddings", True) or (head.data_ptr() != wte.data_ptr() and not torch.equal(head, wte)):
        problems.append("an untied output layer (lm_head differs from wte; this network ties them)")
    if problems:
        raise ValueError(f"from_pretrained({name!r}): this GPT-2 variant cannot be reproduced here, its logits would "
                         f"differ: {'; '.join(problems)}. Load it with transformers itself, or convert it to a "
                         f"standard GPT-2 configuration first.")


def _load_hf_gpt2(model_class, name_or_dir):
    """transformers' from_pretrained, strict. It fills a tensor the files lack with random values and drops
    one it does not know, each with a log line only: a GPT-2 with a random layer would load and run. Here
    either is a ValueError naming the tensors. A pickle (pytorch_model.bin) that would run code is refused
    by transformers (it loads with weights_only=True); that refusal becomes a ValueError too."""
    import pickle

    from common.unpickling import refusal_reason

    try:
        hf, info = model_class.from_pretrained(name_or_dir, output_loading_info=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"refusing to load GPT-2 weights from {name_or_dir}: a pickle file there "
                         f"(pytorch_model.bin) is not plain tensor data that can be read without running code "
                         f"({refusal_reason(e)}). Loading never executes code from a file. Use a directory with "
                         f"model.safetensors (save_pretrained writes one), which cannot hold code.") from None
    causal_buffers = (".attn.bias", ".attn.masked_bias")  # older GPT-2 files store the causal mask: not weights
    unexpected = [k for k in info.get("unexpected_keys") or () if not k.endswith(causal_buffers)]
    problems = [f"{what} {sorted(keys)}" for what, keys in (
        ("missing (transformers would fill them with random values):", info.get("missing_keys")),
        ("unexpected:", unexpected),
        ("of another shape:", [k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys") or ()]))
        if keys]
    problems += list(info.get("error_msgs") or ())
    if problems:
        raise ValueError(f"{name_or_dir}: the GPT-2 weights do not match its config.json; tensors "
                         f"{'; '.join(problems)}. Save the model again with save_pretrained, or fix config.json "
                         f"(n_layer, n_embd, ...) to describe the weights.")
    return hf


class GPT(nn.Module):
    # the ancestral steps these weights were distilled to sample in (models/distillation.py); set by
    # models.weights.load_consolidated from an export that records it, None for every other model
    distilled_steps: Optional[int] = None

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            **({"wpe": nn.Embedding(config.block_size, config.n_embd)} if config.pos_emb == "learned" else {}),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([TransformerLayer(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        # rope: rotary q/k instead of wpe; outside `transformer` so GPT-2's parameter names stay as they are
        self.rotary = (RotaryEmbedding(config.n_embd // config.n_head, config.block_size)
                       if config.pos_emb == "rope" else None)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying (https://paperswithcode.com/method/weight-tying): one matrix embeds and un-embeds
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2 paper: scale the residual projections by 1/sqrt(2 * n_layer) so the residual stream's
        # variance does not grow with depth
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count. Position embeddings are subtracted by default (as in nanoGPT); token
        embeddings are kept because they are tied to (and used as) the output layer. Rope has none."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def hidden_states(self, idx, mask: Optional[AttentionMask] = None, past_kv: Optional[KVCache] = None,
                      positions: Optional[torch.Tensor] = None, max_position: Optional[int] = None):
        """Run the Transformer body: idx (B, T) -> final-LayerNorm states (B, T, C) and this call's KV.

        mask:      which keys each query sees; default is the config's kind with q_offset = T_past.
        past_kv:   keys/values of earlier tokens (one (k, v) per layer); queries are appended after them.
        positions: (B, T) or (T,) position ids, for left-padded batches (or BD3-LM's [x_t ; x_0] input,
                   whose halves share positions); default T_past .. T_past + T - 1. The context limit
                   is on positions: every id must be < block_size, however many tokens there are.
        max_position: the largest id in `positions`, when the caller knows it on the host. Then the check
                   above reads no tensor; without it, positions on the CPU are read, and positions on an
                   accelerator are not checked here (a read would wait for the device; the callers that
                   build them check lengths on the host: the decoding layouts and the API's context check).
        """
        B, T = idx.size()
        t_past = 0 if past_kv is None else past_kv[0][0].size(2)
        if positions is None and t_past + T > self.config.block_size:
            raise ValueError(f"sequence of {t_past + T} tokens is longer than the model's context "
                             f"block_size={self.config.block_size}")
        if max_position is None and positions is not None and positions.numel() and positions.device.type == "cpu":
            max_position = int(positions.max())
        if max_position is not None and max_position >= self.config.block_size:
            raise ValueError(f"position id {max_position} is outside the model's context "
                             f"block_size={self.config.block_size}: the sequence is longer than the context")
        if mask is None:
            mask = self.config.default_mask(q_offset=t_past)
        if positions is None:
            positions = torch.arange(t_past, t_past + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if self.rotary is None:
            x = x + self.transformer.wpe(positions)  # learned: a position vector added to each token
        else:
            rope = self.rotary(positions)  # rope: q and k are rotated inside every attention layer
        x = self.transformer.drop(x)
        presents = []
        for i, layer in enumerate(self.transformer.h):
            x, present = layer(x, mask, None if past_kv is None else past_kv[i], rope)
            presents.append(present)
        return self.transformer.ln_f(x), presents

    def forward(self, idx, mask: Optional[AttentionMask] = None, past_kv: Optional[KVCache] = None,
                positions: Optional[torch.Tensor] = None, return_kv: bool = False):
        """idx (B, T) token ids -> logits (B, T, vocab_size); with return_kv also this call's KV cache."""
        h, presents = self.hidden_states(idx, mask, past_kv, positions)
        logits = self.lm_head(h)  # (B, T, vocab_size)
        return (logits, presents) if return_kv else logits

    # ------------------------------------------------------------------ training helpers (nanoGPT)
    def optimizer_param_groups(self, weight_decay: float) -> list[dict]:
        """Weight decay on every >=2-D tensor (matmuls, embeddings); none on biases and LayerNorms."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        return [{"params": decay, "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]

    def flops_per_token(self, seq_len: Optional[int] = None) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12 L H Q T."""
        cfg = self.config
        T = seq_len or cfg.block_size
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * T

    # ------------------------------------------------------------------ GPT-2 weights
    @classmethod
    def from_pretrained(cls, name_or_dir: str, **overrides) -> "GPT":
        """Load OpenAI GPT-2 weights through `transformers`: a hub name (gpt2, gpt2-medium, gpt2-large,
        gpt2-xl; needs network or a filled HF cache) or a local `save_pretrained` directory.

        OpenAI's checkpoints use a Conv1D module whose weight is the transpose of nn.Linear's, so the
        four matmul weights of every layer (c_attn, attn c_proj, c_fc, mlp c_proj) are transposed.
        The vocabulary stays at GPT-2's 50257 rows so the logits equal the original model's.
        `overrides` may set attention / attn_impl / dropout (e.g. to start a diffusion model from GPT-2).
        """
        from transformers import GPT2LMHeadModel  # heavy import, only needed here

        allowed = {"attention", "block_length", "attn_impl", "dropout"}
        if overrides.get("pos_emb", "learned") != "learned":
            raise ValueError("from_pretrained: GPT-2 checkpoints have learned position embeddings (wpe); "
                             "pos_emb must stay 'learned'")
        overrides.pop("pos_emb", None)
        if set(overrides) - allowed:
            raise ValueError(f"from_pretrained can only override {sorted(allowed)}, got {sorted(overrides)}")
        hf = _load_hf_gpt2(GPT2LMHeadModel, name_or_dir)
        hc = hf.config
        _check_reproducible_gpt2(name_or_dir, hc, hf)
        config = GPTConfig(block_size=hc.n_positions, vocab_size=hc.vocab_size, n_layer=hc.n_layer,
                           n_head=hc.n_head, n_embd=hc.n_embd, bias=True, **overrides)
        model = cls(config)
        sd = model.state_dict()
        sd_hf = {k: v for k, v in hf.state_dict().items()
                 if not k.endswith(".attn.bias") and not k.endswith(".attn.masked_bias")}  # causal buffers
        transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        missing = sorted(set(sd) - set(sd_hf))
        if missing:
            raise ValueError(f"{name_or_dir}: checkpoint lacks {missing[:5]}... — is it a GPT-2 model?")
        with torch.no_grad():
            for k, v in sd_hf.items():
                if k not in sd:
                    continue
                src = v.t() if k.endswith(transposed) else v
                if src.shape != sd[k].shape:
                    raise ValueError(f"{name_or_dir}: shape of {k} is {tuple(src.shape)}, expected {tuple(sd[k].shape)}")
                sd[k].copy_(src)
        return model
