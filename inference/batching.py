"""Requests, the rows that decode them, and the one way decoders call the model.

Every request is a prompt (fixed ids) plus a number of tokens to generate. Every decoder is a `RowSlots`
(`ARRows`, `AncestralRows`, `ConfidenceRows`): up to `capacity` rows, each a canvas of its own from column
0, each at its own step of its own decode, rows joining and leaving at any step. `generate` adds a
batch's requests as rows and steps them to the end (`decode_rows`); the server's scheduler adds requests
as they come. A step is `prepare` (the step's model calls, `RowsCall`), running the calls, and `commit`
(every row's tokens at once). Each row draws its random numbers from its own generator, in the order it
draws them alone, so a row decodes exactly what it decodes alone, whatever else is in the batch.

A batch's result is shown on one (B, T) canvas with LEFT padding (`Layout`), so that all rows start
generating in the same column (or, for block-causal models, in the same block):

    row 0   [pad pad p p p | g g g g g g . .]      g: generated, MASK until committed
    row 1   [p p p p p p p | g g g g . . . .]      .: right padding (a shorter generation)
             ^ key_starts               ^ key_lengths (both index the canvas)

Block-causal models see blocks by index from each row's column 0, so for them the left padding is a
multiple of the model's block length: the canvas blocks then coincide with each row's own blocks.
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


# ----------------------------------------------------------------------------- rows at steps of their own
@dataclass
class RowsCall:
    """One model call of a step of `RowSlots`: `run(model)` is model.hidden_states on these fields."""

    slots: list[int]  # the rows fed, in the order of idx's rows
    idx: torch.Tensor  # (R, W) ids
    mask: Optional[AttentionMask] = None  # None: the model's own (no padding, no past)
    past_kv: Optional[list] = None  # one (k, v) per layer, (R, H, P, D)
    positions: Optional[torch.Tensor] = None  # (R, W); None: P, P + 1, ...
    starts: Optional[list[int]] = None  # each row's first fed column (its cached past); None: column 0

    def run(self, model):
        return model.hidden_states(self.idx, mask=self.mask, past_kv=self.past_kv, positions=self.positions)


class RowSlots:
    """Up to `capacity` independent rows, each a canvas of its own of at most `width` columns (from column
    0), decoded step by step, every row at its own point of its own decode: what a server runs, rows
    joining and leaving at any step. A subclass (`AncestralRows`, `ConfidenceRows`, `ARRows`) holds a rule:
    `prepare` returns a step's model calls (`RowsCall`, run by the caller) and `commit` takes their
    results, commits every row's tokens and says which rows finished.

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
        self.kv: Optional[torch.Tensor] = None  # (N * W, 2 L, H, D) every row's KV cache (`_past_call`)

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

    def _whole_calls(self, slots: list[int], split: Optional[Callable[[list[int]], list[list[int]]]],
                     ends: Optional[list[int]] = None) -> list[RowsCall]:
        """Calls feeding these rows columns [0, ends[i]) (default: their whole canvas), right-padded to the
        longest and hidden by key_lengths: one call, or one per group of split(their widths) (a scheduler
        that weighs padding against calls)."""
        lengths = ends if ends is not None else [self.rows[s].length for s in slots]
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

    # ------------------------------------------------------------------ each row's KV cache
    # The KV cache of all rows is one buffer, `kv`: (rows x width) columns of every layer's keys and values,
    # column c of slot s at s * W + c, allocated on the first write. A row holds the keys/values of its first
    # columns (`_keep_kv`); a call feeds each row the columns after them (`_past_call`).

    def _past_call(self, slots: list[int], starts: list[int], ends: list[int]) -> RowsCall:
        """One call feeding row i columns [starts[i], ends[i]) after its cached keys/values of [0, starts[i]).

        The pasts are read RIGHT-aligned into a window of the longest, Q (one gather for every row and layer),
        so every row's first fed column sits at key Q, the one q_offset of the call; the columns before row
        i's past are hidden by key_starts = Q - starts[i], and its queries are right-padded to the widest
        (hidden by key_lengths). A query then sees exactly the keys it sees alone. A block-causal model sees
        blocks by key index: the pasts of one call must differ by whole blocks (the caller groups them)."""
        dev, W = self.device, self.x.size(1)
        index = torch.tensor(slots, device=dev)
        past = torch.tensor(starts, device=dev)  # (R,)
        Q, width = max(starts), max(e - s for s, e in zip(starts, ends))
        lead = Q - past  # (R,) hidden columns before each row's past
        cols = (torch.arange(Q, device=dev)[None, :] - lead[:, None]).clamp(min=0)  # (R, Q)
        window = self.kv[index[:, None] * W + cols]  # (R, Q, 2L, H, D): one gather for every row and layer
        past_kv = [(window[:, :, 2 * i].transpose(1, 2), window[:, :, 2 * i + 1].transpose(1, 2))
                   for i in range(window.size(2) // 2)]  # per layer (R, H, Q, D)
        fed = (past[:, None] + torch.arange(width, device=dev)[None, :]).clamp(max=W - 1)  # (R, w) columns fed
        widths = [e - s for s, e in zip(starts, ends)]
        cfg = self.model.config
        mask = AttentionMask(kind=cfg.attention, block_length=cfg.block_length, q_offset=Q,
                             key_starts=lead if min(starts) < Q else None,
                             key_lengths=(torch.tensor(widths, device=dev) + Q) if min(widths) < width else None)
        return RowsCall(slots, self.x[index[:, None], fed], mask, past_kv, fed, list(starts))

    def _keep_kv(self, call: RowsCall, presents: list, keep: list[int]) -> None:
        """Store the keys/values of the first keep[i] columns a call fed row i (`presents`: the call's, one
        (k, v) per layer, (R, H, w, D)); the row then holds its columns up to starts[i] + keep[i]."""
        if not any(keep):
            return
        dev, W = self.device, self.x.size(1)
        new = torch.stack([t for kv in presents for t in kv], dim=2)  # (R, H, 2L, w, D)
        new = new.permute(0, 3, 2, 1, 4)  # (R, w, 2L, H, D)
        if self.kv is None:
            self.kv = new.new_zeros(self.x.size(0) * W, *new.shape[2:])
        starts = torch.tensor(call.starts or [0] * len(call.slots), device=dev)  # (R,)
        cols = starts[:, None] + torch.arange(new.size(1), device=dev)[None, :]  # (R, w)
        kept = torch.arange(new.size(1), device=dev)[None, :] < torch.tensor(keep, device=dev)[:, None]  # (R, w)
        index = torch.tensor(call.slots, device=dev)
        self.kv[(index[:, None] * W + cols)[kept]] = new[kept]

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


def decode_rows(model, rows: RowSlots, layout: Layout, add_row: Callable[[int, list[int]], int],
                on_step: Optional[StepHook] = None) -> DecodeResult:
    """Decode every row of a layout as a row of `rows` (add_row(b, prompt ids) adds row b and returns its
    slot) to the end; the result on the layout's (left-padded) canvas. Columns a row never reached (an AR row
    stopped at EOT) keep the layout's filler and leave the result's `gen`."""
    B = layout.batch_size
    starts, gen_starts = layout.key_starts.tolist(), layout.gen_starts.tolist()
    row_of = {add_row(b, layout.x[b, starts[b]:gen_starts[b]].tolist()): b for b in range(B)}
    x = layout.x.clone()
    nfe, steps = torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.long)
    made = [0] * B  # generated columns of each row
    calls = 0

    def write_back(slots):  # the rows' tokens into the layout's canvas
        for s, ids in zip(slots, rows.generated(slots)):
            b = row_of[s]
            x[b, gen_starts[b]:gen_starts[b] + len(ids)] = torch.tensor(ids, dtype=torch.long, device=x.device)
            nfe[b], steps[b], made[b] = rows.rows[s].nfe, rows.rows[s].steps, len(ids)

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
    ends = layout.gen_starts + torch.tensor(made, device=x.device)  # (B,)
    gen = layout.gen & (torch.arange(x.size(1), device=x.device)[None, :] < ends[:, None])
    return DecodeResult(x, nfe, steps, calls, Layout(**{**layout.__dict__, "gen": gen}))
