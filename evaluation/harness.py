"""lm-evaluation-harness backend: evaluate diffusionGPT's AR, MDLM and BD3-LM models (and GPT-2) like the
ecosystem does.

    python -m evaluation.harness --model diffusiongpt --model_args ckpt=out/shakespeare_mdlm \\
        --tasks shakespeare_cloze,shakespeare_ppl          # the offline tasks in evaluation/tasks/
    python -m evaluation.harness --model diffusiongpt --model_args init_from=gpt2 --tasks lambada_openai

`python -m evaluation.harness` is lm-eval's own command line (every flag of `lm_eval run`) with this
module imported first, which registers the model name "diffusiongpt" with lm-eval's registry
(`@register_model`), and with `--include_path evaluation/tasks` added. From Python:

    import evaluation.harness, lm_eval
    lm_eval.simple_evaluate(model="diffusiongpt", model_args="ckpt=out/shakespeare_mdlm,mc_samples=64",
                            tasks=["shakespeare_cloze"], task_manager=evaluation.harness.task_manager())

model_args (comma separated, key=value):
  ckpt=DIR | init_from=gpt2|HF_DIR   what inference.loading.load_model loads (exactly one of them)
  device=auto|cpu|cuda  batch_size=N (requests per model call; lm-eval's --batch_size)
  mc_samples=32       Monte-Carlo samples of the diffusion bound per request (>= 1)
  seed=1234           seed of the Monte-Carlo masks (and of sampling in generate_until)
  pad_to_context=true diffusion models score a request as the first tokens of a full context window, the
                      rest MASK (the window they were trained on); false: exactly context + continuation
  strategy, steps, tokens_per_step, threshold, block_length, block_rule, kv_cache, max_gen_toks
                      generate_until's decoding (inference.api; the task's until / max_gen_toks /
                      temperature / top_p / top_k / do_sample apply on top)

What each request type computes (docs/evaluation.md has the maths):
  loglikelihood          AR: exact log p(continuation | context), the `hf` backend's computation.
                         MDLM / BD3-LM: minus the NELBO of the continuation given the clean context, a
                         lower bound on log p, estimated with `mc_samples` antithetic masks (exact when
                         the continuation is short enough to enumerate every mask); its Monte-Carlo
                         standard error is in the logged samples ("-12.3456 ± 0.4321 (...)").
                         A shifted model (GPTConfig.shift) predicts each token from the position before it, so
                         it needs at least one context token (lm-eval gives EOT to an empty context).
  loglikelihood_rolling  the same over lm-eval's rolling windows of the text (the model's context).
  generate_until         inference.api.generate_with_stats on a padded canvas, cut at the stop sequences.
Contexts longer than the model's context are truncated from the left, as the harness expects.
"""
from __future__ import annotations

import hashlib
import logging
import math
import sys
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: find the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lm_eval.models  # noqa: F401  lm-eval's own models first: its registry imports them only while it is empty
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from inference.api import generate_with_stats
from inference.loading import load_model, resolve_device
from kernels.attention import AttentionMask
from models.diffusion import align_predictions, block_diffusion_states, next_token_logits, subs_logits

log = logging.getLogger(__name__)

MODEL_NAME = "diffusiongpt"
TASKS_DIR = Path(__file__).resolve().parent / "tasks"
LOCAL_TASKS = ("shakespeare_cloze", "shakespeare_ppl")
DEFAULT_BATCH_SIZE = 16
# generate_until knobs a user may set in model_args; inference.api checks their values
DECODE_KNOBS = ("strategy", "steps", "tokens_per_step", "threshold", "block_length", "block_rule", "kv_cache")
# generation kwargs of a task that generate_until understands (after lm-eval's normalize_gen_kwargs)
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k")


class HarnessInputError(ValueError):
    """Bad input to the backend (model_args, checkpoint, a request it cannot score): the CLI prints the
    message and exits 2 instead of a traceback."""


class LogLikelihood(float):
    """A log-likelihood (or its diffusion lower bound) that carries its Monte-Carlo standard error.

    It is a float for every computation lm-eval does; str() -- what lm-eval writes into the logged
    samples' "resps" -- shows the standard error and how it was estimated."""

    def __new__(cls, value: float, stderr: float = 0.0, how: str = "exact"):
        obj = super().__new__(cls, value)
        obj.stderr, obj.how = float(stderr), how
        return obj

    def __str__(self) -> str:
        if self.how == "exact":
            return repr(float(self))
        return f"{float(self):.6f} ± {self.stderr:.6f} ({self.how})"

    __repr__ = __str__

    def __reduce__(self):  # lm-eval's --use_cache pickles responses
        return LogLikelihood, (float(self), self.stderr, self.how)


# ----------------------------------------------------------------------------- the diffusion bound
def mask_plan(n: int, mc_samples: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Which of n continuation tokens each sample masks, and the weight of each masked token's -log p.

    -> masks (R, n) bool, weights (R,) float64, exact. The NELBO of the n tokens (the clean rest held
    fixed) is  sum_r weights[r] * sum_{i masked in row r} -log p(x_i | row r's visible tokens).

    The continuous-time NELBO with the masking fraction t ~ U(0, 1) (linear schedule) equals, once the
    Bernoulli noise of the count is integrated out,  sum_{l=1..n} (1/l) E_{|S| = l}[ sum_{i in S} -log p ]:
      exact (2^n - 1 <= mc_samples): every nonempty subset S once, weight 1 / (|S| C(n, |S|)); full set last.
      Monte Carlo: K = mc_samples antithetic times t_k = (u + k/K) mod 1, l_k = floor(t_k n) + 1 tokens
                   masked (uniform on 1..n), the subset uniform; weight n / (l_k K) (a mean over samples).
    """
    if 2 ** n - 1 <= mc_samples:
        subsets = [s for l in range(1, n + 1) for s in combinations(range(n), l)]
        masks = torch.zeros(len(subsets), n, dtype=torch.bool)
        weights = torch.empty(len(subsets), dtype=torch.float64)
        for r, s in enumerate(subsets):
            masks[r, list(s)] = True
            weights[r] = 1.0 / (len(s) * math.comb(n, len(s)))
        return masks, weights, True
    K = mc_samples
    u = torch.rand(1, generator=generator, dtype=torch.float64)
    t = (u + torch.arange(K, dtype=torch.float64) / K) % 1.0  # (K,) antithetic times
    counts = (torch.floor(t * n) + 1).clamp(max=n).long()  # (K,) masked tokens, uniform on 1..n
    ranks = torch.rand(K, n, generator=generator).argsort(dim=1).argsort(dim=1)  # (K, n) random order
    masks = ranks < counts[:, None]
    return masks, n / (counts.double() * K), False


@dataclass
class DiffusionRequest:
    """One (context, continuation) laid out for scoring: `rows` copies of ids, each with its own mask."""

    ids: list[int]  # context (left-truncated) + continuation
    cont_start: int
    masked: torch.Tensor  # (R, L) bool: positions replaced by MASK in each row
    weight: torch.Tensor  # (R, L) float64: weight of each masked position's -log p in the estimate
    unit: torch.Tensor  # (L,) long: scoring unit of each position (-1 = context)
    mc_units: list[int]  # units estimated by Monte Carlo (the others are exact)
    n_units: int
    greedy_row: int  # the row with the whole continuation masked
    samples: int  # mc_samples (for the standard error of the Monte-Carlo units)

    @property
    def rows(self) -> int:
        return self.masked.size(0)


def plan_request(context: list[int], continuation: list[int], block_length: int, mc_samples: int,
                 seed: int) -> DiffusionRequest:
    """Lay out one request. block_length = 0: MDLM, the continuation is one scoring unit; b > 0: BD3-LM,
    one unit per block of b positions (each block's bound, given the clean blocks before it, is
    independent of the others', so all blocks share the rows). The masks are drawn from a generator seeded
    by the seed and the context, so the choices of one question share their random times."""
    ids = context + continuation
    L, c0 = len(ids), len(context)
    generator = torch.Generator().manual_seed(_request_seed(seed, context))
    if block_length:
        edges = sorted({c0, L} | set(range((c0 // block_length + 1) * block_length, L, block_length)))
    else:
        edges = [c0, L]
    units = list(zip(edges[:-1], edges[1:]))
    plans = [mask_plan(hi - lo, mc_samples, generator) for lo, hi in units]
    rows = max(m.size(0) for m, _, _ in plans)
    all_exact = all(exact for _, _, exact in plans)
    greedy_extra = 0 if all_exact else 1  # exact plans end with their full mask: right-align them on the last row
    R = rows + greedy_extra
    masked = torch.zeros(R, L, dtype=torch.bool)
    weight = torch.zeros(R, L, dtype=torch.float64)
    unit = torch.full((L,), -1, dtype=torch.long)
    for u, ((lo, hi), (m, w, exact)) in enumerate(zip(units, plans)):
        r0 = rows - m.size(0) if exact else 0
        masked[r0:r0 + m.size(0), lo:hi] = m
        weight[r0:r0 + m.size(0), lo:hi] = w[:, None] * m
        unit[lo:hi] = u
    if greedy_extra:
        masked[-1, c0:] = True  # weight 0: only read for is_greedy
    return DiffusionRequest(ids, c0, masked, weight, unit, [u for u, p in enumerate(plans) if not p[2]],
                            len(units), R - 1, mc_samples)


def _request_seed(seed: int, context: list[int]) -> int:
    digest = hashlib.sha256(f"{seed}:{','.join(map(str, context))}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


def finish_request(req: DiffusionRequest, nll: torch.Tensor, argmax_ok: torch.Tensor) -> tuple[LogLikelihood, bool]:
    """nll (R, L) float64 of each position's true token (0 where unmasked); argmax_ok (L,) of the greedy row."""
    contrib = nll * req.weight  # (R, L)
    per_unit = torch.zeros(req.rows, req.n_units, dtype=torch.float64)
    scored = req.unit >= 0
    per_unit.index_add_(1, req.unit[scored], contrib[:, scored])  # (R, units)
    nelbo = float(per_unit.sum())
    var = 0.0
    for u in req.mc_units:  # per-sample values K * row value; s.e. of their mean
        values = per_unit[:req.samples, u] * req.samples  # rows 0..K-1 are the K samples (the last row is is_greedy's)
        var += float(values.var(unbiased=True)) / len(values) if len(values) > 1 else float("nan")
    how = "exact bound" if not req.mc_units else f"MC s.e., {req.samples} samples"
    greedy = bool(argmax_ok[req.cont_start:].all())
    return LogLikelihood(-nelbo, math.sqrt(var), how), greedy


# ----------------------------------------------------------------------------- the backend
class DiffusionGPTLM(TemplateLM):
    """lm-eval model for everything inference.loading.load_model loads (see the module docstring)."""

    def __init__(self, ckpt: Optional[str] = None, init_from: Optional[str] = None, device: Optional[str] = None,
                 batch_size=DEFAULT_BATCH_SIZE, max_batch_size=None, mc_samples: int = 32, seed: int = 1234,
                 pad_to_context: bool = True, max_gen_toks: int = 256, attn_impl: str = "auto", **decode):
        super().__init__()
        unknown = sorted(set(decode) - set(DECODE_KNOBS))
        if unknown:
            raise HarnessInputError(f"unknown model_args {unknown} for --model {MODEL_NAME}; known: ckpt, "
                                    f"init_from, device, batch_size, mc_samples, seed, pad_to_context, max_gen_toks, "
                                    f"attn_impl, {', '.join(DECODE_KNOBS)}")
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
            raise HarnessInputError(f"mc_samples must be an integer >= 1 (Monte-Carlo samples of the diffusion "
                                    f"bound per request), got {mc_samples!r}")
        if isinstance(max_gen_toks, bool) or not isinstance(max_gen_toks, int) or max_gen_toks < 1:
            raise HarnessInputError(f"max_gen_toks must be an integer >= 1, got {max_gen_toks!r}")
        if not isinstance(pad_to_context, bool):
            raise HarnessInputError(f"pad_to_context must be true or false, got {pad_to_context!r}")
        if (ckpt is None) == (init_from is None):
            raise HarnessInputError(f"--model {MODEL_NAME} needs exactly one of model_args ckpt=DIR (a diffusionGPT "
                                    f"checkpoint) or init_from=gpt2|HF_DIR")
        source = ckpt if ckpt is not None else init_from
        try:
            loaded = load_model(ckpt=None if ckpt is None else str(ckpt),
                                init_from=None if init_from is None else str(init_from),
                                device=_device(device), attn_impl=attn_impl, log=log.info)
        except (FileNotFoundError, ValueError, OSError) as e:
            raise HarnessInputError(f"cannot load {source!r} as a model: {e}") from e
        self.loaded = loaded
        self.model = loaded.model.eval()
        self.tokenizer = loaded.tokenizer
        self.objective = loaded.objective
        self._device = next(self.model.parameters()).device
        self.batch_size = _batch_size(batch_size)
        self.mc_samples = mc_samples
        self.seed = int(seed)
        self.pad_to_context = pad_to_context
        self._max_gen_toks = max_gen_toks
        self.decode = decode
        self.block_length = self.model.config.block_length if self.objective == "bd3lm" else 0
        if self.block_length and self.max_length % self.block_length:
            raise HarnessInputError(f"{source}: context {self.max_length} is not a multiple of the BD3-LM block "
                                    f"{self.block_length}")
        log.info(f"{MODEL_NAME}: {loaded.source} ({self.objective}, context {self.max_length}, "
                 f"tokenizer {self.tokenizer.name}) on {self._device}")

    # -------------------------------------------------------------- what lm-eval asks of a model
    @property
    def max_length(self) -> int:
        return self.model.config.block_size

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eot_id

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        try:
            return self.tokenizer.encode(string)
        except ValueError as e:  # the char tokenizer: a character outside the corpus
            raise HarnessInputError(f"{e} (this model's tokenizer is {self.tokenizer.name!r}; tasks with other "
                                    f"text need a GPT-2 BPE model)") from None

    def tok_decode(self, ids) -> str:
        return self.tokenizer.decode(ids)

    # -------------------------------------------------------------- loglikelihood
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs = [(ctx, cont) for _, ctx, cont in requests]
        results = self._score_pairs(pairs, disable_tqdm)
        for (key, _, _), res in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Sum over lm-eval's rolling windows (each window predicts its tokens given the token before it;
        the last window gets a full context). Diffusion windows are one token shorter: context + window
        must fit the model's context, because a diffusion model sees its whole input."""
        window = self.max_length if self.objective == "ar" else self.max_length - 1
        pairs, owner = [], []
        for i, req in enumerate(requests):
            (text,) = req.args
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.eot_token_id,
                    max_seq_len=window, context_len=1)):
                pairs.append((ctx, cont))
                owner.append(i)
        scores = self._score_pairs(pairs, disable_tqdm)
        totals = [[0.0, 0.0, "exact"] for _ in requests]
        for i, (ll, _) in zip(owner, scores):
            totals[i][0] += float(ll)
            totals[i][1] += ll.stderr ** 2
            if ll.how != "exact":
                totals[i][2] = ll.how
        out = []
        for req, (ll, var, how) in zip(requests, totals):
            out.append(LogLikelihood(ll, math.sqrt(var), how))
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, out[-1])
        return out

    def _score_pairs(self, pairs: list[tuple[list[int], list[int]]], disable_tqdm: bool):
        """(context ids, continuation ids) -> (LogLikelihood, is_greedy), in order."""
        limit = self.max_length + 1 if self.objective == "ar" else self.max_length
        # a shifted diffusion model predicts token i from position i - 1: the context keeps >= 1 token
        first = int(self.objective != "ar" and self.model.config.shift)
        fitted, truncated = [], 0
        for ctx, cont in pairs:
            if len(cont) > self.max_length - first:
                room = f"{self.max_length} tokens" + (", less one context token: the model is shifted" if first else "")
                raise HarnessInputError(f"a continuation of {len(cont)} tokens is longer than the model's context "
                                        f"({room}): it cannot be scored")
            if first and cont and not ctx:
                raise HarnessInputError("this diffusion model is shifted (config.shift): nothing predicts the first "
                                        "token, so a continuation needs a context of at least one token (e.g. EOT)")
            keep = max(0, limit - len(cont))
            truncated += len(ctx) > keep
            fitted.append((ctx[len(ctx) - keep:] if len(ctx) > keep else ctx, cont))
        if truncated:
            log.warning(f"{truncated} of {len(pairs)} requests are longer than the model's context "
                        f"({self.max_length} tokens): their contexts were truncated from the left")
        if self.objective == "ar":
            return self._ar_scores(fitted, disable_tqdm)
        return self._diffusion_scores(fitted, disable_tqdm)

    @torch.no_grad()
    def _ar_scores(self, pairs, disable_tqdm):
        """Exact: sum of log p(token | everything before it) over the continuation (the `hf` backend's maths).
        Requests are sorted by length and right-padded (a causal model never looks right)."""
        out: list = [None] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        vocab = self.tokenizer.vocab_size
        for chunk in _progress(_chunks(order, self.batch_size), disable_tqdm, "loglikelihood (AR)"):
            inputs = [(pairs[i][0] + pairs[i][1])[:-1] for i in chunk]
            width = max(map(len, inputs))
            x = torch.full((len(chunk), width), self.eot_token_id, dtype=torch.long)
            for r, ids in enumerate(inputs):
                x[r, :len(ids)] = torch.tensor(ids)
            logp = F.log_softmax(next_token_logits(self.model, x.to(self._device), vocab), dim=-1)  # (B, T, V)
            for r, i in enumerate(chunk):
                cont = torch.tensor(pairs[i][1], device=self._device)
                end = len(inputs[r])
                lp = logp[r, end - len(cont):end]  # (n, V): the predictions of the continuation tokens
                ll = float(lp.gather(1, cont[:, None]).sum())
                out[i] = (LogLikelihood(ll), bool((lp.argmax(-1) == cont).all()))
        return out

    @torch.no_grad()
    def _diffusion_scores(self, pairs, disable_tqdm):
        """Minus the NELBO of each continuation given its clean context (see mask_plan): every request's rows
        (mc_samples masks plus one fully masked row for is_greedy) go through the model together with the
        rows of other requests, batch_size requests per call."""
        plans = [plan_request(ctx, cont, self.block_length, self.mc_samples, self.seed) if cont else None
                 for ctx, cont in pairs]
        out: list = [(LogLikelihood(0.0), True) if p is None else None for p in plans]
        order = sorted((i for i, p in enumerate(plans) if p is not None), key=lambda i: -len(plans[i].ids))
        for chunk in _progress(_chunks(order, self.batch_size), disable_tqdm, f"loglikelihood ({self.objective})"):
            for i, res in zip(chunk, self._diffusion_batch([plans[i] for i in chunk])):
                out[i] = res
        bounds = [o[0] for o in out if o[0].how != "exact"]
        if bounds:
            log.info(f"diffusion bound of {len(pairs)} requests: mean Monte-Carlo s.e. "
                     f"{sum(b.stderr for b in bounds) / len(bounds):.4f} nats ({self.mc_samples} samples each)")
        return out

    def _diffusion_batch(self, plans: list[DiffusionRequest]):
        tok, b = self.tokenizer, self.block_length
        lengths = [len(p.ids) for p in plans]
        if self.pad_to_context:
            width = self.max_length  # a window of the model's context, the tokens after the request MASKed
        else:
            width = max(lengths)
            if b:
                width = -(-width // b) * b  # whole blocks; a partial last block is completed with MASK
        rows = sum(p.rows for p in plans)
        x0 = torch.full((rows, width), tok.mask_id, dtype=torch.long)
        masked = torch.zeros(rows, width, dtype=torch.bool)
        key_lengths = torch.empty(rows, dtype=torch.long)
        r = 0
        for p in plans:
            L = len(p.ids)
            x0[r:r + p.rows, :L] = torch.tensor(p.ids)
            masked[r:r + p.rows, :L] = p.masked
            key_lengths[r:r + p.rows] = L
            r += p.rows
        x0, masked = x0.to(self._device), masked.to(self._device)
        xt = torch.where(masked, tok.mask_id, x0)  # (R, W)
        if b:  # BD3-LM: one pass over [x_t ; x_0], each noised block sees itself and the clean blocks before it
            h = block_diffusion_states(self.model, xt, x0, b)  # (R, W, C), read at the noised half
        else:
            mask = None if self.pad_to_context else AttentionMask(
                self.model.config.attention, block_length=self.model.config.block_length,
                key_lengths=key_lengths.to(self._device))
            h, _ = self.model.hidden_states(xt, mask=mask)  # (R, W, C)
            h = align_predictions(h, self.model.config.shift)  # the state predicting each position
        logits = subs_logits(self.model.lm_head(h[masked]).float(), tok.mask_id)  # (N_masked, V): never MASK
        logp = F.log_softmax(logits, dim=-1)
        targets = x0[masked]
        nll = torch.zeros(rows, width, dtype=torch.float64, device=self._device)
        nll[masked] = -logp.gather(1, targets[:, None]).squeeze(1).double()
        hit = torch.zeros(rows, width, dtype=torch.bool, device=self._device)
        hit[masked] = logp.argmax(-1) == targets
        nll, hit = nll.cpu(), hit.cpu()
        out, r = [], 0
        for p in plans:
            L = len(p.ids)
            out.append(finish_request(p, nll[r:r + p.rows, :L], hit[r + p.greedy_row, :L]))
            r += p.rows
        return out

    # -------------------------------------------------------------- generate_until
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Group requests by their generation kwargs; each group is one generate_with_stats call (batched on
        a padded canvas, batch_size requests per batch), every text cut at the first stop sequence."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items(), key=lambda kv: kv[0])), []).append(i)
        out: list = [None] * len(requests)
        for idx in groups.values():
            gen_kwargs = requests[idx[0]].args[1]
            texts = self._generate([requests[i].args[0] for i in idx], gen_kwargs)
            for i, text in zip(idx, texts):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out

    def _generate(self, contexts: list[str], gen_kwargs: dict) -> list[str]:
        kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=self.tokenizer.decode([self.eot_token_id]))
        max_new = int(kwargs.pop("max_gen_toks"))
        ignored = sorted(set(kwargs) - set(GEN_KWARGS))
        if ignored:
            log.warning(f"{MODEL_NAME} ignores the generation kwargs {ignored} (it understands {', '.join(GEN_KWARGS)})")
        if max_new >= self.max_length:
            log.warning(f"max_gen_toks={max_new} does not fit the model's context ({self.max_length}): generating "
                        f"{self.max_length - 1} tokens")
            max_new = self.max_length - 1
        keep = self.max_length - max_new
        prompts = PromptIds(self.tokenizer)
        truncated = 0
        for text in contexts:
            ids = self.tok_encode(text)
            truncated += len(ids) > keep
            prompts.ids[text] = ids[-keep:] if len(ids) > keep else ids
        if truncated:
            log.warning(f"{truncated} of {len(contexts)} prompts are longer than the model's context minus "
                        f"max_gen_toks ({keep} tokens): truncated from the left")
        greedy = not kwargs.get("do_sample", False) or float(kwargs.get("temperature") or 0.0) == 0.0
        knobs = dict(self.decode, temperature=0.0 if greedy else float(kwargs["temperature"]),
                     top_k=kwargs.get("top_k"), top_p=kwargs.get("top_p"), seed=self.seed, batch_size=self.batch_size)
        if self.objective != "ar":
            knobs.setdefault("schedule", self.loaded.schedule)
        done = generate_with_stats(self.model, prompts, contexts, max_new, **knobs)
        return [postprocess_generated_text(c.text, until, None) for c in done]


if __name__ != "__main__":  # `python -m evaluation.harness` registers the importable module's class (below)
    register_model(MODEL_NAME)(DiffusionGPTLM)


class PromptIds:
    """The model's tokenizer, except that encode() returns the ids the backend prepared for each prompt
    (left-truncated at the token level, as the harness does) instead of re-encoding truncated text."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: dict[str, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        return list(self.ids[text]) if text in self.ids else self.tokenizer.encode(text)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def _device(device: Optional[str]) -> str:
    """lm-eval's CLI passes --device (default cuda); without a GPU that means the CPU, as for its hf backend."""
    if device and str(device).startswith("cuda") and not torch.cuda.is_available():
        log.warning(f"device={device} but no CUDA device is available: running on the CPU")
        return "cpu"
    return resolve_device(device or "auto")


def _batch_size(value) -> int:
    if isinstance(value, str) and value.startswith("auto"):
        log.info(f"{MODEL_NAME}: batch_size={value} -> {DEFAULT_BATCH_SIZE} requests per model call")
        return DEFAULT_BATCH_SIZE
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = 0
    if size < 1:
        raise HarnessInputError(f"batch_size must be an integer >= 1 (requests per model call), got {value!r}")
    return size


def _chunks(items: list, n: int):
    return [items[i:i + n] for i in range(0, len(items), n)]


def _progress(chunks, disable: bool, desc: str):
    if disable or len(chunks) < 2:
        return chunks
    from tqdm import tqdm
    return tqdm(chunks, desc=desc, unit="batch", dynamic_ncols=True)


# ----------------------------------------------------------------------------- the command line
def task_manager(**kwargs):
    """lm-eval's TaskManager with this repository's offline tasks (evaluation/tasks) included."""
    from lm_eval.tasks import TaskManager
    return TaskManager(include_path=str(TASKS_DIR), **kwargs)


NETWORK_ERRORS = ("ConnectionError", "OfflineModeIsEnabled", "DatasetNotFoundError", "HfHubHTTPError",
                  "LocalEntryNotFoundError", "MaxRetryError", "Timeout", "ConnectTimeout")


def is_network_error(e: BaseException) -> bool:
    """A data set (or model) download that failed: no network, or HF_*_OFFLINE set."""
    while e is not None:
        if type(e).__name__ in NETWORK_ERRORS or any(c.__name__ in NETWORK_ERRORS for c in type(e).__mro__):
            return True
        text = str(e)
        if "offline" in text.lower() or "couldn't reach" in text.lower() or "internet connection" in text.lower():
            return True
        e = e.__cause__ or e.__context__
    return False


def check_run_args(args) -> None:
    """HarnessInputError for a `run` that lm-eval would only fail deep inside, with a traceback."""
    limit = getattr(args, "limit", None)
    if limit is not None and limit <= 0:
        raise HarnessInputError(f"--limit {limit:g} selects no documents: give a count (--limit 10), a fraction of "
                                f"each task (--limit 0.1), or leave it out for the whole task")


def is_unknown_task(e: BaseException) -> bool:
    """lm-eval's refusal of a --tasks name it does not know (its message names them: "Tasks not found: x")."""
    return isinstance(e, ValueError) and str(e).startswith("Tasks not found")


def main(argv: Optional[list[str]] = None) -> None:
    """lm-eval's CLI (`lm_eval run ...`) with the diffusiongpt model registered and evaluation/tasks included."""
    import traceback

    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] not in ("run", "ls", "validate", "-h", "--help"):
        args.insert(0, "run")  # lm_eval's own shorthand: no subcommand means run
    if args and args[0] in ("run", "ls", "validate") and not any(a.startswith("--include_path") for a in args):
        args += ["--include_path", str(TASKS_DIR)]
    setup_logging()
    cli = HarnessCLI()
    old_argv = sys.argv
    sys.argv = ["lm_eval"] + args
    try:
        parsed = cli.parse_args()
        check_run_args(parsed)
        cli.execute(parsed)
    except HarnessInputError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except Exception as e:
        if is_unknown_task(e):
            print(f"error: {e} (neither one of lm-eval's tasks nor one in {TASKS_DIR}). List them with: python -m "
                  f"evaluation.harness ls tasks; offline, use --tasks {','.join(LOCAL_TASKS)}", file=sys.stderr)
            raise SystemExit(2)
        if not is_network_error(e):
            raise
        traceback.print_exc()
        print(f"\n{MODEL_NAME}: the task needs its data set from the network, which is not reachable here. Offline, "
              f"use a task with local data files: --tasks {','.join(LOCAL_TASKS)} (evaluation/tasks/, see "
              f"docs/evaluation.md), or your own YAML via --include_path DIR.", file=sys.stderr)
        raise SystemExit(1)
    finally:
        sys.argv = old_argv


if __name__ == "__main__":
    from evaluation import harness  # imported once under its own name: that registers "diffusiongpt"
    harness.main()
