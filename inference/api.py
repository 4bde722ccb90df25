"""The Python API behind `python -m inference.sample`: prompts in, text and per-request stats out.

    from inference import DecodeOptions, generate, generate_with_stats, load_model
    loaded = load_model(ckpt="out/export")
    texts = generate(loaded.model, loaded.tokenizer, ["Once upon", "The"], max_new_tokens=64,
                     strategy="threshold", threshold=0.9, temperature=0)
    done = generate_with_stats(...)  # Completion: text, token_ids, nfe, steps, tokens_per_s, ...
    opts = DecodeOptions.from_dict({"strategy": "blocks", "block_length": 16})  # checked here: ValueError
    done = generate_with_stats(loaded.model, loaded.tokenizer, prompts, 64, options=opts)

Decoding options are one dataclass, `DecodeOptions` (the CLI's defaults; checked when built, and
against the model by `for_model`); each strategy is one entry of `DECODERS`: the rows (`RowSlots`) that
decode it, every request a row of its own at steps of its own, drawing from its own generator (seed + its
index in the call), so a request decodes the same whatever else is in the batch. `add_request` turns a
request's options into its row (the server's scheduler adds its rows the same way).

Strategies (see inference/ancestral_rows.py, inference/confidence_rows.py, inference/diffusion_rows.py and
inference/ar_decoding.py for the maths):
  ancestral  MDLM ancestral sampling, `steps` time steps (default: the generation length L, or for a
             distilled model the steps it was distilled for)
  topk       commit the k most confident per step: `tokens_per_step`=k, or `steps` (default k = 1)
  random     commit k randomly chosen masked positions per step (LLaDA random remasking); k = 1 is
             exact sampling from the model, the one-token-per-step baseline
  threshold  commit every token with confidence > `threshold` (at least one per step; `steps` caps calls)
  blocks     semi-autoregressive blocks of `block_length`, inner rule `block_rule` (topk | threshold |
             random), `steps` in total over all blocks, KV cache of the finished prefix (`kv_cache`)
Block-causal (BD3-LM) models are always decoded block by block, left to right (that is the model
they are: a block is predicted from the clean blocks before it): every diffusion strategy runs inside
the model's blocks (or `block_length`, a multiple of them), `steps` spread over the blocks, and every
rule keeps the exact KV cache of the finished blocks (`kv_cache`).
  ar         autoregressive sampling, KV cache (`kv_cache`)
temperature 0 is greedy; top_k / top_p filter the sampling distribution.
"""
from __future__ import annotations

import numbers
import time
from dataclasses import asdict, dataclass, fields, replace
from typing import Callable, Mapping, Optional, Sequence, Union

import torch

from inference.ancestral_rows import AncestralRows
from inference.ar_decoding import ARRows
from inference.batching import DecodeResult, Layout, Request, RowSlots, StepHook, build_layout, decode_rows, plan_batches
from inference.commit_rules import CommitRandom, CommitThreshold, CommitTopK
from inference.confidence_rows import ConfidenceRows
from inference.diffusion_rows import steps_per_block
from inference.sampling import Sampler
from models.diffusion import NoiseSchedule

DIFFUSION_STRATEGIES = ("ancestral", "topk", "random", "threshold", "blocks")
STRATEGIES = DIFFUSION_STRATEGIES + ("ar",)
BLOCK_RULES = ("topk", "random", "threshold")
DEFAULT_BLOCK_LENGTH = 32  # semi-AR block for bidirectional models (LLaDA's default)


@dataclass(frozen=True)
class DecodeOptions:
    """How to decode, checked on construction (ValueError naming the field and what it accepts).

    The defaults are the ones of `python -m inference.sample` (nanoGPT's sample.py: temperature 0.8,
    top-k 200); the CLI takes its defaults from here, and a server builds these from a JSON body with
    `DecodeOptions.from_dict`. What depends on the model (the default strategy, the block length of a
    block-causal model) is filled in by `for_model`. See the module docstring for the strategies.
    """

    strategy: Optional[str] = None  # one of STRATEGIES; None = "ar" for AR models, "ancestral" otherwise
    steps: Optional[int] = None  # ancestral: time steps (default L, or what a distilled model was distilled for);
    #                              topk/random: spread L over them;
    #                              threshold: cap on calls; blocks: steps over all blocks
    tokens_per_step: Optional[int] = None  # topk / random / blocks: commit k per step (default 1 unless steps)
    threshold: float = 0.9  # threshold rule: confidence tau in [0, 1]
    block_length: Optional[int] = None  # blocks: diffusion block (default: the model's, else DEFAULT_BLOCK_LENGTH)
    block_rule: str = "topk"  # blocks: the rule inside a block, one of BLOCK_RULES
    kv_cache: bool = True  # blocks / ar / block-causal models (every rule): reuse the finished prefix's keys/values
    temperature: float = 0.8  # 0 = greedy
    top_k: Optional[int] = 200  # sample among the k most likely tokens; None = all
    top_p: Optional[float] = None  # nucleus: the smallest set with probability >= top_p; None = all
    stop_at_eot: bool = True  # cut each text at its first EOT (and stop decoding that row)
    schedule: str = "loglinear"  # noise schedule of ancestral sampling (a checkpoint says which it used)
    batch_size: int = 8  # requests decoded together
    seed: int = 1337

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Every check that does not need the model; raises ValueError naming the field."""
        if self.strategy is not None and self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; expected one of {', '.join(STRATEGIES)}")
        for name in ("steps", "tokens_per_step", "batch_size", "block_length"):
            _check_positive(name, getattr(self, name))
        if self.steps is not None and self.tokens_per_step is not None:
            raise ValueError("give steps or tokens_per_step, not both")
        if self.block_rule not in BLOCK_RULES:
            raise ValueError(f"unknown block_rule {self.block_rule!r}; expected one of {', '.join(BLOCK_RULES)}")
        for name in ("threshold", "temperature", "top_p"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
                raise ValueError(f"{name} must be a number, got {value!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)):
            raise ValueError(f"top_k must be an integer >= 1 (or None for all tokens), got {self.top_k!r}")
        for name in ("kv_cache", "stop_at_eot"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not -2 ** 63 <= self.seed < 2 ** 63:  # request i of a call draws from seed + i: torch takes < 2**64
            raise ValueError(f"seed must be a 64-bit signed integer (from -2**63 to 2**63 - 1), got {self.seed}")
        self.sampler()  # temperature >= 0, top_k >= 1, top_p in (0, 1]
        NoiseSchedule(self.schedule)  # a known schedule
        if self.strategy == "threshold" or (self.strategy == "blocks" and self.block_rule == "threshold"):
            CommitThreshold(self.threshold)  # tau in [0, 1]

    def for_model(self, model) -> "DecodeOptions":
        """These options for `model`: the strategy must suit it (diffusion rules for diffusion models,
        'ar' for AR ones), the default strategy and block length are filled in, and a block-causal
        model's decoding blocks must be a multiple of its own. A distilled model (models.weights: its export
        records `distillation`) decodes ancestrally in the steps it was distilled for unless steps are given."""
        strategy = self.strategy or ("ar" if model.config.kind == "ar" else "ancestral")
        check_strategy(model, strategy)
        block_length = self.block_length
        align = model.config.block_alignment
        if strategy == "blocks" or (align and strategy != "ar"):  # block-causal models: always in blocks
            if block_length is None:
                block_length = align or DEFAULT_BLOCK_LENGTH
            if align and block_length % align:
                raise ValueError(f"this block-causal model was trained with blocks of {align}; decoding blocks "
                                 f"must be a multiple of it (got block_length={block_length})")
        steps = self.steps
        if strategy == "ancestral" and steps is None and self.tokens_per_step is None:
            steps = getattr(model, "distilled_steps", None)
        return replace(self, strategy=strategy, block_length=block_length, steps=steps)

    def sampler(self) -> Sampler:
        return Sampler(self.temperature, self.top_k, self.top_p)

    @classmethod
    def from_dict(cls, d: Mapping) -> "DecodeOptions":
        """Options from a mapping (a JSON body); a missing key keeps its default, an unknown one is an error."""
        if not isinstance(d, Mapping):
            raise ValueError(f"decoding options must be an object of option: value, got {type(d).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"unknown decoding option(s) {', '.join(map(repr, unknown))}; "
                             f"known options: {', '.join(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


# The Python API (generate / generate_with_stats) samples the model's own distribution unless told
# otherwise, as it always has: temperature 1, no top-k. Everything else is DecodeOptions' default.
API_SAMPLING_DEFAULTS = dict(temperature=1.0, top_k=None)


@dataclass
class Completion:
    """One request's result. token_ids are the generated ids (after EOT trimming); text decodes them."""

    prompt: str
    text: str
    token_ids: list[int]
    prompt_ids: list[int]
    strategy: str
    nfe: int  # model calls this request took part in
    steps: int  # decoding steps (ancestral: time steps, including the ones served from the cache)
    elapsed_s: float  # wall time of the batch it was decoded in
    tokens_per_s: float  # len(token_ids) / elapsed_s
    stopped_at_eot: bool
    batch_index: int = 0  # which batch decoded it (requests of one batch share elapsed_s)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class StepInfo:
    """What an `on_step` callback sees after every decoding step of a batch."""

    request_ids: list[int]  # indices into the prompts list
    token_ids: list[list[int]]  # each request's generated region so far (MASK = tokenizer.mask_id)
    nfe: list[int]


def check_model_and_tokenizer(model, tokenizer) -> None:
    """The model's embedding rows must be this tokenizer's vocabulary (exactly, or padded with MASK)."""
    rows = model.config.vocab_size
    if rows not in (tokenizer.vocab_size, tokenizer.padded_vocab_size):
        raise ValueError(
            f"the checkpoint's vocabulary ({rows} embedding rows) does not match the tokenizer "
            f"{tokenizer.name!r} ({tokenizer.vocab_size} ids, {tokenizer.padded_vocab_size} padded): the model "
            f"was trained with another tokenizer")
    if model.config.kind == "diffusion" and tokenizer.mask_id >= rows:
        raise ValueError(f"diffusion model without a MASK row: mask id {tokenizer.mask_id} >= {rows} rows")


def check_strategy(model, strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    kind, attention = model.config.kind, model.config.attention
    if kind == "ar" and strategy != "ar":
        raise ValueError(f"strategy {strategy!r} is a diffusion-only rule, but this model is autoregressive "
                         f"(attention={attention}); use strategy 'ar'")
    if kind == "diffusion" and strategy == "ar":
        raise ValueError(f"strategy 'ar' needs an autoregressive model, but this one is a diffusion model "
                         f"(attention={attention}); use one of {', '.join(DIFFUSION_STRATEGIES)}")


def _check_positive(name, value):
    if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def request_lengths(prompts: Sequence[str], max_new_tokens: Union[int, Sequence[int]]) -> list[int]:
    """The number of tokens to generate for each prompt, after checking both lists."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise ValueError("prompts must be a list of strings")
    if len(prompts) == 0:
        raise ValueError("the prompt list is empty: give at least one prompt")
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a list of strings")
    lengths = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(lengths) != len(prompts):
        raise ValueError(f"{len(lengths)} max_new_tokens values for {len(prompts)} prompts")
    for n in lengths:
        _check_positive("max_new_tokens", n)
    return lengths


def encode_requests(model, tokenizer, prompts: Sequence[str], lengths: Sequence[int]) -> list[Request]:
    """Tokenize each prompt; prompt + its new tokens must fit the model's context (block_size)."""
    context = model.config.block_size
    requests = []
    for i, (text, n) in enumerate(zip(prompts, lengths)):
        ids = tokenizer.encode(text)
        if not ids and model.config.needs_first_token:
            ids = [tokenizer.eot_id]
        if len(ids) >= context:
            raise ValueError(f"prompt {i} is {len(ids)} tokens long, longer than the model's context "
                             f"(block_size={context}); shorten it")
        if len(ids) + n > context:
            raise ValueError(f"prompt {i} ({len(ids)} tokens) + {n} new tokens = {len(ids) + n} exceeds the "
                             f"model's context (block_size={context}); lower max_new_tokens to "
                             f"{context - len(ids)} or shorten the prompt")
        requests.append(Request(ids, n))
    return requests


def call_options(strategy: Optional[str], options: Optional[DecodeOptions], knobs: dict) -> DecodeOptions:
    """The options of one generate call: `options` (or the Python API's defaults) with `strategy` and
    the keyword knobs on top. An unknown knob is a TypeError, as for any keyword argument."""
    base = options if options is not None else DecodeOptions(**API_SAMPLING_DEFAULTS)
    if strategy is not None:
        knobs = {**knobs, "strategy": strategy}
    return replace(base, **knobs) if knobs else base


def generate_with_stats(model, tokenizer, prompts: Sequence[str], max_new_tokens: Union[int, Sequence[int]],
                        strategy: Optional[str] = None, *, options: Optional[DecodeOptions] = None,
                        progress: bool = False, on_step: Optional[Callable[[StepInfo], None]] = None,
                        **knobs) -> list[Completion]:
    """Decode every prompt; returns one Completion per prompt, in order.

    How to decode: `options` (a DecodeOptions) and/or its fields as keywords (steps=..., threshold=...,
    temperature=..., seed=...), which override it. Without `options` the defaults are DecodeOptions'
    except temperature 1 and no top-k (API_SAMPLING_DEFAULTS). progress: a tqdm bar; on_step: called
    with a StepInfo after every step. Every input is checked before the first model call."""
    options = call_options(strategy, options, knobs)
    lengths = request_lengths(prompts, max_new_tokens)
    options = options.for_model(model)
    check_model_and_tokenizer(model, tokenizer)
    requests = encode_requests(model, tokenizer, prompts, lengths)

    kind, align = model.config.kind, model.config.block_alignment
    device = next(model.parameters()).device
    stop_id = tokenizer.eot_id if options.stop_at_eot else None
    fill_id = tokenizer.mask_id if kind == "diffusion" else tokenizer.eot_id
    batches = plan_batches(requests, options.batch_size, model.config.block_size, 0 if kind == "ar" else align)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=sum(lengths), unit="tok", desc=options.strategy, dynamic_ncols=True)

    out: list[Optional[Completion]] = [None] * len(requests)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch_index, batch in enumerate(batches):
                layout = build_layout([requests[i] for i in batch], fill_id, tokenizer.eot_id,
                                      0 if kind == "ar" else align, device)
                generators = [torch.Generator(device=device).manual_seed(options.seed + i) for i in batch]
                t0 = time.perf_counter()
                res = decode_layout(model, tokenizer, layout, options, generators, stop_id, default_steps=max(lengths),
                                    on_step=_make_hook(batch, layout, options.strategy, tokenizer.mask_id, bar, on_step))
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                elapsed = time.perf_counter() - t0
                for row, i in enumerate(batch):
                    out[i] = _completion(prompts[i], requests[i], res, row, elapsed, options.strategy, tokenizer,
                                         stop_id, batch_index)
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    return out


def decode_layout(model, tokenizer, layout: Layout, options: DecodeOptions, generators: Sequence[torch.Generator],
                  stop_id: Optional[int] = None, default_steps: Optional[int] = None,
                  on_step: Optional[StepHook] = None) -> DecodeResult:
    """Decode one laid-out batch (`build_layout`) with options resolved for the model (`for_model`): each row
    of the layout a row of the rows that decode options.strategy (`new_rows`), added by `add_request` with
    its own generator, stepped to the end. default_steps: the ancestral time steps when options.steps is
    None (default: the layout's longest generation)."""
    rows = new_rows(model, tokenizer, options.strategy, layout.batch_size, layout.x.size(1))
    default_steps = default_steps or max(layout.gen_lens)
    return decode_rows(model, rows, layout, lambda b, prompt_ids: add_request(
        rows, options, prompt_ids, layout.gen_lens[b], generators[b], stop_id, default_steps), on_step)


def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: Union[int, Sequence[int]],
             strategy: Optional[str] = None, **knobs) -> list[str]:
    """Generated continuation of each prompt (text only; see generate_with_stats for the knobs)."""
    return [c.text for c in generate_with_stats(model, tokenizer, prompts, max_new_tokens, strategy, **knobs)]


# ----------------------------------------------------------------------------- one table: strategy -> rows
DECODERS: dict[str, type[RowSlots]] = {
    "ancestral": AncestralRows,
    "topk": ConfidenceRows,
    "random": ConfidenceRows,
    "threshold": ConfidenceRows,
    "blocks": ConfidenceRows,
    "ar": ARRows,
}


def new_rows(model, tokenizer, strategy: str, capacity: int, width: int) -> RowSlots:
    """Empty rows of the kind that decodes `strategy`: capacity rows of at most width columns."""
    kind = DECODERS[strategy]
    if kind is ARRows:
        return ARRows(model, tokenizer.vocab_size, capacity, width)
    return kind(model, tokenizer.mask_id, tokenizer.vocab_size, capacity, width)


def commit_rule(name: str, steps, tokens_per_step, threshold, generator=None):
    """The commit rule of a confidence / random strategy with its step budget."""
    if name == "threshold":
        return CommitThreshold(threshold, steps)
    budget = dict(steps=steps) if steps else dict(tokens_per_step=tokens_per_step or 1)
    return CommitRandom(generator, **budget) if name == "random" else CommitTopK(**budget)


def add_request(rows: RowSlots, options: DecodeOptions, prompt_ids: list[int], gen_len: int,
                generator: torch.Generator, stop_id: Optional[int], default_steps: int) -> int:
    """Add one request to `rows` (of its kind: `new_rows(..., options.strategy, ...)`) as its options (resolved
    for the model) ask; returns its slot. stop_id: EOT when stop_at_eot (AR rows stop at it, a finished block
    holding it ends a block row). default_steps: the ancestral time steps when options.steps is None.

    Block by block: the `blocks` strategy and every rule of a block-causal model (block_length, with the KV
    cache of the finished blocks when kv_cache), `steps` spread over a row's blocks."""
    o, sampler = options, options.sampler()
    if isinstance(rows, ARRows):
        return rows.add(prompt_ids, gen_len, sampler, generator, stop_id, o.kv_cache)
    block_length = o.block_length if (o.strategy == "blocks" or rows.align) else None
    kv_cache = o.kv_cache and block_length is not None
    blocks = rows.blocks(len(prompt_ids), gen_len, block_length)
    if isinstance(rows, AncestralRows):
        steps = steps_per_block(o.steps or default_steps, blocks)
        return rows.add(prompt_ids, gen_len, steps, NoiseSchedule(o.schedule), sampler, generator, block_length,
                        kv_cache)
    if block_length is None:
        rule = commit_rule(o.strategy, o.steps, o.tokens_per_step, o.threshold)
    else:
        rule = commit_rule(o.block_rule if o.strategy == "blocks" else o.strategy, None, o.tokens_per_step,
                           o.threshold)
        if o.steps:
            rule = rule.with_steps(steps_per_block(o.steps, blocks))
    return rows.add(prompt_ids, gen_len, rule, sampler, generator, block_length, kv_cache,
                    stop_id if block_length else None)


def generated_ids(res: DecodeResult, row: int) -> list[int]:
    """The ids of a row's generated region, left to right."""
    return res.x[row][res.layout.gen[row]].tolist()


def _completion(prompt, request, res: DecodeResult, row, elapsed, strategy, tokenizer, stop_id,
                batch_index) -> Completion:
    return completion_from_ids(prompt, request.prompt_ids, generated_ids(res, row), strategy, int(res.nfe[row]),
                               int(res.steps[row]), elapsed, tokenizer, stop_id, batch_index)


def completion_from_ids(prompt: str, prompt_ids: list[int], ids: list[int], strategy: str, nfe: int, steps: int,
                        elapsed: float, tokenizer, stop_id: Optional[int], batch_index: int = 0) -> Completion:
    """A request's Completion from its generated ids, cut at its first stop_id (EOT) if any."""
    stopped = stop_id is not None and stop_id in ids
    if stopped:
        ids = ids[:ids.index(stop_id)]
    return Completion(prompt=prompt, text=tokenizer.decode(ids), token_ids=ids, prompt_ids=prompt_ids,
                      strategy=strategy, nfe=nfe, steps=steps, elapsed_s=elapsed,
                      tokens_per_s=len(ids) / max(elapsed, 1e-9), stopped_at_eot=stopped, batch_index=batch_index)


def _make_hook(batch, layout, strategy, mask_id, bar, on_step):
    """Per-step callback of one batch: advances the progress bar and calls the user's on_step."""
    if bar is None and on_step is None:
        return None
    state = {"done": 0}
    ar = strategy == "ar"

    def hook(x, res: DecodeResult):
        if bar is not None:
            done = int(res.steps.sum()) if ar else int(((x != mask_id) & layout.gen).sum())
            bar.update(done - state["done"])
            bar.set_postfix(nfe=res.calls, refresh=False)
            state["done"] = done
        if on_step is not None:
            rows = []
            for r in range(len(batch)):
                start = int(layout.gen_starts[r])
                if ar:
                    rows.append(x[r, start:start + int(res.steps[r])].tolist())
                else:
                    rows.append(x[r][layout.gen[r]].tolist())
            on_step(StepInfo(list(batch), rows, res.nfe.tolist()))
    return hook
