"""A batch of requests laid out on one canvas, and the one way decoders call the model on it.

Every request is a prompt (fixed ids) plus a number of tokens to generate. A batch puts them on one
(B, T) canvas with LEFT padding, so that all rows start generating in the same column (or, for
block-causal models, in the same block):

    row 0   [pad pad p p p | g g g g g g . .]      g: generated, MASK until committed
    row 1   [p p p p p p p | g g g g . . . .]      .: right padding (a shorter generation)
             ^ key_starts               ^ key_lengths (both index the canvas)

Each row carries its own position ids (position 0 at its first real token), and the attention mask
hides the left padding (key_starts) and everything after the row's own end (key_lengths). A row
therefore computes exactly what it would compute alone, which is what makes batched decoding equal
to one-by-one decoding.

Block-causal models see blocks by canvas index (`kernels.attention.dense_mask`), so for them the left
padding is a multiple of the model's block length: the canvas blocks then coincide with each row's
own blocks, and the first generated position of every row falls in the same canvas block.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from inference.sampling import predict_tokens
from kernels.attention import AttentionMask


@dataclass
class Request:
    prompt_ids: list[int]
    max_new_tokens: int


@dataclass
class Layout:
    """One batch on its canvas. All index tensors are canvas columns."""

    x: torch.Tensor  # (B, T) ids: padding, prompt, MASK at the positions to generate
    gen: torch.Tensor  # (B, T) bool: positions this batch generates
    positions: torch.Tensor  # (B, T) position ids (0 at each row's first real token; 0 on padding)
    key_starts: torch.Tensor  # (B,) first real column of each row
    key_lengths: torch.Tensor  # (B,) one past the last column of each row (prompt + its generation)
    gen_starts: torch.Tensor  # (B,) first generated column
    anchor: int  # column where block 0 of semi-autoregressive decoding starts
    prompt_lens: list[int] = field(default_factory=list)
    gen_lens: list[int] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        return self.x.size(0)


@dataclass
class DecodeResult:
    x: torch.Tensor  # (B, T) final canvas
    nfe: torch.Tensor  # (B,) model calls each row took part in
    steps: torch.Tensor  # (B,) decoding steps each row took (ancestral: time steps, cached ones too)
    calls: int  # model calls for the whole batch
    layout: Layout


StepHook = Callable[[torch.Tensor, DecodeResult], None]  # (canvas x, partial result) after each step


def left_pads(prompt_lens: list[int], align: int) -> tuple[list[int], int]:
    """Left padding of each row and the column where generation starts (the anchor).

    align = 0: every prompt ends at the anchor column.
    align = b: pads are multiples of b and the block holding each row's first generated position is
               the canvas block starting at the anchor (block-causal models).
    """
    if align <= 0:
        anchor = max(prompt_lens)
        return [anchor - p for p in prompt_lens], anchor
    first_block = [p // align for p in prompt_lens]
    top = max(first_block)
    return [(top - g) * align for g in first_block], top * align


def canvas_width(prompt_lens: list[int], gen_lens: list[int], align: int) -> int:
    pads, _ = left_pads(prompt_lens, align)
    return max(pad + p + g for pad, p, g in zip(pads, prompt_lens, gen_lens))


def plan_batches(requests: list[Request], batch_size: int, context: int, align: int) -> list[list[int]]:
    """Group request indices (in order) into batches of at most batch_size whose canvas fits the
    model's context. Every request fits alone (checked by the caller), padding may not: a request
    that would push the canvas past the context starts a new batch."""
    batches, current = [], []
    for i, r in enumerate(requests):
        trial = current + [i]
        width = canvas_width([len(requests[j].prompt_ids) for j in trial],
                             [requests[j].max_new_tokens for j in trial], align)
        if current and (len(trial) > batch_size or width > context):
            batches.append(current)
            trial = [i]
        current = trial
    if current:
        batches.append(current)
    return batches


def build_layout(requests: list[Request], fill_id: int, pad_id: int, align: int, device) -> Layout:
    """Lay the requests out on a canvas. Generated positions hold fill_id (MASK for diffusion; for AR
    a placeholder the decoder overwrites), padding holds pad_id (never attended to)."""
    prompt_lens = [len(r.prompt_ids) for r in requests]
    gen_lens = [r.max_new_tokens for r in requests]
    pads, anchor = left_pads(prompt_lens, align)
    B = len(requests)
    T = max(pad + p + g for pad, p, g in zip(pads, prompt_lens, gen_lens))
    x = torch.full((B, T), pad_id, dtype=torch.long)
    gen = torch.zeros(B, T, dtype=torch.bool)
    for b, (r, pad) in enumerate(zip(requests, pads)):
        start = pad + len(r.prompt_ids)
        x[b, pad:start] = torch.tensor(r.prompt_ids, dtype=torch.long)
        x[b, start:start + r.max_new_tokens] = fill_id
        gen[b, start:start + r.max_new_tokens] = True
    key_starts = torch.tensor(pads, dtype=torch.long)
    gen_starts = key_starts + torch.tensor(prompt_lens, dtype=torch.long)
    key_lengths = gen_starts + torch.tensor(gen_lens, dtype=torch.long)
    positions = (torch.arange(T)[None, :] - key_starts[:, None]).clamp(min=0)  # (B, T)
    return Layout(x=x.to(device), gen=gen.to(device), positions=positions.to(device),
                  key_starts=key_starts.to(device), key_lengths=key_lengths.to(device),
                  gen_starts=gen_starts.to(device), anchor=anchor,
                  prompt_lens=prompt_lens, gen_lens=gen_lens)


class ModelRunner:
    """Runs the Transformer body on some rows and columns of a canvas and counts the calls.

    `hidden(rows, q_lo, q_hi, past_kv)` feeds canvas columns [q_lo, q_hi) of `rows` as queries; past_kv,
    if given, must hold the keys/values of columns [0, q_lo) of the same rows. Returns the final hidden
    states (R, q_hi - q_lo, C) and this call's KV (one (k, v) per layer, (R, H, q_hi - q_lo, D)).
    Output layer and sampling are applied by the caller, only where a token is needed. A call whose rows
    have no padding among its keys (no left padding, nothing past a row's end before q_hi: one request,
    or requests of equal length) passes no key_lengths / key_starts, so attention takes its unpadded
    path (on a CPU, SDPA without a materialised mask: ~10% of a one-row MDLM call of the quickstart model).
    """

    def __init__(self, model, layout: Layout, x: torch.Tensor):
        self.model = model
        self.layout = layout
        self.x = x  # the canvas being decoded (updated in place by the decoder)
        self.kind = model.config.attention
        self.block_length = model.config.block_length
        self.calls = 0  # model calls for the whole batch
        self.nfe = torch.zeros(layout.batch_size, dtype=torch.long)  # calls each row took part in
        self._starts, self._ends = layout.key_starts.tolist(), layout.key_lengths.tolist()  # host copies

    def hidden(self, rows: torch.Tensor, q_lo: int, q_hi: int, past_kv: Optional[list] = None):
        if (q_lo > 0) != (past_kv is not None):
            raise AssertionError("queries from column q_lo > 0 need the KV cache of columns [0, q_lo)")
        lay = self.layout
        padded = any(self._starts[r] > 0 or self._ends[r] < q_hi for r in rows.tolist())  # keys are [0, q_hi)
        mask = AttentionMask(kind=self.kind, block_length=self.block_length, q_offset=q_lo,
                             key_lengths=lay.key_lengths[rows] if padded else None,
                             key_starts=lay.key_starts[rows] if padded else None)
        h, presents = self.model.hidden_states(self.x[rows, q_lo:q_hi], mask=mask, past_kv=past_kv,
                                               positions=lay.positions[rows, q_lo:q_hi])
        self.calls += 1
        self.nfe[rows.cpu()] += 1
        return h, presents


class RowKVCache:
    """Keys/values of the first columns of each row of a batch's canvas: row r holds columns
    [0, lengths[r]), one (k, v) per layer, in (B, H, T, D) buffers allocated on the first write.

    A model call feeds columns from one q_lo for all its rows, so the rows of a call must hold the same
    number of columns (`length`). Rows may differ between calls: an ancestral row that has not yet run
    in the current block still holds the blocks before the previous one's end, while the rows that have
    run hold one more finished block."""

    def __init__(self, batch_size: int, width: int):
        self.width = width  # canvas columns T
        self.kv: Optional[list] = None  # [(k, v)] per layer, each (B, H, T, D)
        self.lengths = [0] * batch_size  # columns held by each row

    def length(self, rows: torch.Tensor) -> int:
        return self._held(rows.tolist())

    def _held(self, ids: list[int]) -> int:
        held = {self.lengths[r] for r in ids}
        if len(held) > 1:
            raise AssertionError(f"rows of one call hold different numbers of cached columns: {sorted(held)}")
        return held.pop() if held else 0

    @staticmethod
    def _index(rows: torch.Tensor, ids: list[int]):
        """A run of consecutive rows (a one-row batch, or every row) as a slice: views, not copies."""
        return slice(ids[0], ids[-1] + 1) if ids and ids == list(range(ids[0], ids[-1] + 1)) else rows

    def get(self, rows: torch.Tensor) -> Optional[list]:
        """These rows' cached keys/values (R, H, length, D), or None when they hold nothing."""
        ids = rows.tolist()
        n = self._held(ids)
        if n == 0:
            return None
        index = self._index(rows, ids)
        return [(k[index, :, :n], v[index, :, :n]) for k, v in self.kv]

    def write(self, rows: torch.Tensor, presents: list, q_lo: int, n: int) -> None:
        """Store the first n columns of `presents` (a call's keys/values of `rows`, fed from column q_lo)
        as columns [q_lo, q_lo + n): the rows then hold q_lo + n columns (q_lo = 0 replaces the cache)."""
        if self.kv is None:
            B = len(self.lengths)
            self.kv = [tuple(t.new_zeros(B, t.size(1), self.width, t.size(3)) for t in kv) for kv in presents]
        ids = rows.tolist()
        index = self._index(rows, ids)
        for (k, v), (nk, nv) in zip(self.kv, presents):
            k[index, :, q_lo:q_lo + n] = nk[:, :, :n]
            v[index, :, q_lo:q_lo + n] = nv[:, :, :n]
        for r in ids:
            self.lengths[r] = q_lo + n


# ----------------------------------------------------------------------------- rows at steps of their own
@dataclass
class RowsCall:
    """One model call of a step of `RowSlots`: `run(model)` is model.hidden_states on these fields."""

    slots: list[int]  # the rows fed, in the order of idx's rows
    idx: torch.Tensor  # (R, W) ids
    mask: Optional[AttentionMask] = None  # None: the model's own (no padding, no past)
    past_kv: Optional[list] = None  # one (k, v) per layer, (R, H, P, D)
    positions: Optional[torch.Tensor] = None  # (R, W); None: P, P + 1, ...

    def run(self, model):
        return model.hidden_states(self.idx, mask=self.mask, past_kv=self.past_kv, positions=self.positions)


class RowSlots:
    """Up to `capacity` independent rows, each a canvas of its own of at most `width` columns (from column
    0), decoded step by step, every row at its own point of its own decode: what a server runs, rows
    joining and leaving at any step. A subclass (`AncestralRows`, `ConfidenceRows`, `ARRows`) holds a rule:
    `prepare` returns a step's model calls (`RowsCall`, run by the caller, merged with others if it likes)
    and `commit` takes their results, commits every row's tokens and says which rows finished.

    Each row has its own sampler and random generator: `_sample` samples the positions of many rows in one
    output layer and sampling call per sampler, each row drawing from its generator exactly what it would
    draw alone (`inference.sampling.predict_tokens`)."""

    def __init__(self, model, vocab_limit: int, capacity: int, width: int):
        self.model, self.vocab_limit = model, vocab_limit
        self.device = next(model.parameters()).device
        self.x = torch.zeros(capacity, width, dtype=torch.long, device=self.device)  # (N, W) every row's canvas
        self.rows: dict = {}  # slot -> the row's state (a subclass's dataclass with gen_start, length, sampler, generator)
        self._free = list(range(capacity - 1, -1, -1))
        self._calls: list[RowsCall] = []  # prepare's calls, until commit
        self.calls = 0  # model calls asked for
        self.failed: dict[int, Exception] = {}  # rows whose last step failed (slot -> why); the caller removes them

    @property
    def active(self) -> int:
        return len(self.rows)

    def _take_slot(self, canvas: list[int], prompt_len: int, gen_len: int) -> int:
        """A free slot holding `canvas` from column 0 (checked: it fits, it generates something)."""
        if not self._free:
            raise RuntimeError(f"all {self.x.size(0)} rows are taken")
        if gen_len < 1 or prompt_len + gen_len > self.x.size(1):  # the canvas is the prompt, or prompt + MASKs
            raise ValueError(f"a row of {prompt_len} + {gen_len} columns does not fit {self.x.size(1)} columns")
        slot = self._free.pop()
        self.x[slot, :len(canvas)] = torch.tensor(canvas, dtype=torch.long).to(self.device)
        return slot

    def _whole_calls(self, slots: list[int], split: Optional[Callable[[list[int]], list[list[int]]]]) -> list[RowsCall]:
        """Calls feeding these rows their whole canvas (columns [0, length), right-padded to the longest and
        hidden by key_lengths): one call, or one per group of split(their lengths) (a scheduler that weighs
        padding against calls)."""
        lengths = [self.rows[s].length for s in slots]
        groups = split(lengths) if (split is not None and len(slots) > 1) else [list(range(len(slots)))]
        cfg, calls = self.model.config, []
        for group in groups:
            if not group:
                continue
            part, widths = [slots[i] for i in group], [lengths[i] for i in group]
            width = max(widths)
            mask = None if min(widths) == width else AttentionMask(
                kind=cfg.attention, block_length=cfg.block_length, key_lengths=torch.tensor(widths, device=self.device))
            calls.append(RowsCall(part, self.x[torch.tensor(part, device=self.device), :width], mask))
        return calls

    def remove(self, slot: int) -> None:
        """The row leaves (finished, failed or cancelled), between a commit and the next prepare."""
        del self.rows[slot]
        self.failed.pop(slot, None)
        self._free.append(slot)

    def _succeeded(self, stepped: list[int], finished: list[int]) -> tuple[list[int], list[int]]:
        """commit's (stepped, finished) without the rows that failed this step (`failed`)."""
        if not self.failed:
            return stepped, finished
        return [s for s in stepped if s not in self.failed], [s for s in finished if s not in self.failed]

    def generated(self, slots: list[int]) -> list[list[int]]:
        """Each row's generated ids so far (columns gen_start to its length), one host copy for all."""
        if not slots:
            return []
        canvases = self.x[torch.tensor(slots, device=self.device)].tolist()
        return [c[self.rows[s].gen_start:self.rows[s].length] for s, c in zip(slots, canvases)]

    def _sample(self, slots: list[int], counts: list[int], states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """states (N, C): counts[i] positions of slots[i], row after row -> their tokens (N,) and confidences (N,).
        A row whose model output is not finite (its confidences are NaN) fails alone: it is put in `failed`,
        its tokens are placeholders, and every other row of the step is sampled as it would be without it."""
        tokens, conf = self._sample_by_sampler(slots, counts, states)
        finite = torch.isfinite(conf)
        if not bool(finite.all()):
            row = torch.repeat_interleave(torch.arange(len(slots), device=conf.device),
                                          torch.tensor(counts, device=conf.device))  # (N,) each position's row
            for i in sorted(set(row[~finite].tolist())):
                self.failed[slots[i]] = FloatingPointError(
                    "the model's output for this request is not a finite number (NaN or inf), so no token can be "
                    "drawn from it: the checkpoint's weights hold NaN/inf, or a half-precision run overflowed "
                    "(serve with --dtype float32)")
        return tokens, conf

    def _sample_by_sampler(self, slots: list[int], counts: list[int], states: torch.Tensor):
        groups: dict = {}
        for i, s in enumerate(slots):
            groups.setdefault(self.rows[s].sampler, []).append(i)
        if len(groups) == 1:
            sampler = next(iter(groups))
            return predict_tokens(self.model, states, self.vocab_limit, sampler,
                                  [self.rows[s].generator for s in slots], counts)
        starts = [0]
        for n in counts:
            starts.append(starts[-1] + n)
        tokens = torch.empty(states.size(0), dtype=torch.long, device=states.device)
        conf = None
        for sampler, members in groups.items():  # rows with the same sampling knobs draw in one go
            index = torch.tensor([j for i in members for j in range(starts[i], starts[i + 1])], device=states.device)
            t, c = predict_tokens(self.model, states[index], self.vocab_limit, sampler,
                                  [self.rows[slots[i]].generator for i in members], [counts[i] for i in members])
            if conf is None:
                conf = c.new_empty(states.size(0))  # the dtype a call of its own returns
            tokens[index], conf[index] = t, c
        return tokens, conf


class MaskedRowSlots(RowSlots):
    """RowSlots of a diffusion rule: a row's canvas is its prompt then gen_len MASKs, and `todo` marks the
    columns still masked. A shifted model (GPTConfig.shift) predicts column c from the state of column
    c - 1, so its rows need a prompt token."""

    def __init__(self, model, mask_id: int, vocab_limit: int, capacity: int, width: int):
        super().__init__(model, vocab_limit, capacity, width)
        self.mask_id = mask_id
        self.shift = int(model.config.shift)
        self.todo = torch.zeros(capacity, width, dtype=torch.bool, device=self.device)  # (N, W) still masked

    def _take_masked_slot(self, prompt_ids: list[int], gen_len: int) -> int:
        if self.shift and not prompt_ids:
            raise ValueError("a shifted model predicts each token from the column before it: give the row at "
                             "least one prompt token")
        slot = self._take_slot(list(prompt_ids) + [self.mask_id] * gen_len, len(prompt_ids), gen_len)
        self.todo[slot] = False
        self.todo[slot, len(prompt_ids):len(prompt_ids) + gen_len] = True
        return slot


def decode_rows(model, rows: RowSlots, layout: Layout, add_row: Callable[[int, list[int]], int],
                on_step: Optional[StepHook] = None) -> DecodeResult:
    """Decode every row of a layout as a row of `rows` (add_row(b, prompt ids) adds row b and returns its
    slot) to the end; the result on the layout's (left-padded) canvas, as the batch decoders return it."""
    B = layout.batch_size
    starts, gen_starts = layout.key_starts.tolist(), layout.gen_starts.tolist()
    row_of = {add_row(b, layout.x[b, starts[b]:gen_starts[b]].tolist()): b for b in range(B)}
    x = layout.x.clone()
    nfe, steps = torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.long)
    calls = 0

    def write_back(slots):  # the rows' tokens into the layout's canvas
        for s, ids in zip(slots, rows.generated(slots)):
            b = row_of[s]
            x[b, gen_starts[b]:gen_starts[b] + len(ids)] = torch.tensor(ids, dtype=torch.long, device=x.device)
            nfe[b], steps[b] = rows.rows[s].nfe, rows.rows[s].steps

    while rows.active:
        results = [call.run(model) for call in rows.prepare()]
        calls += len(results)
        stepped, finished = rows.commit(results)
        if rows.failed:  # a row the model gave no finite output for: the batch API has nobody else to tell
            raise next(iter(rows.failed.values()))
        write_back(stepped if on_step is not None else finished)
        if on_step is not None:
            on_step(x, DecodeResult(x, nfe, steps, calls, layout))
        for s in finished:
            rows.remove(s)
    return DecodeResult(x, nfe, steps, calls, layout)
