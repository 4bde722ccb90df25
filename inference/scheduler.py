"""Step-level continuous batching: many decodes, few model calls per step.

Serving is decoding plus a scheduler, in two ways. Rows of a rule over the whole canvas of a bidirectional
model (ancestral, the MDLM default; topk, random, threshold) and AR rows (with their KV cache, the AR
default, or without) are rows of the scheduler's `RowSlots` of that kind (`AncestralRows`, `ConfidenceRows`, `ARRows`:
the classes `generate` decodes such batches with): each step the scheduler thread takes their calls from
them and lets them commit every row at once, one output layer and sampling for all of them. Every other
row (one choice of one request) runs the ordinary batch decoder, `inference.api.generate_with_stats`, on
its own one-row canvas in its own thread, so every such rule (blocks, every rule of a block-causal
model), its commit logic, its random generator, its KV cache and its stop rule are the decoder's
own: the scheduler adds no decoding logic. What it changes is the model the decoder sees. A `RowModel`
stands in for the real model: when a decoder asks for hidden states it hands the call to the scheduler and
waits. The scheduler waits until every thread row has either asked for its next call or finished, adds
the RowSlots' calls, runs the calls together, commits those rows and hands each thread row its slice:

    step k     row A (topk, step 7 of 12)   row B (ar, token 30, cached)   row C (blocks, block 3, cached)
               canvas [a a a M a M]          past 29 cols + [b]             past 16 cols + [c c M M M M M M]
    merged     each call's past keys/values LEFT-padded to the longest past Q (hidden by key_starts),
               its queries RIGHT-padded to the widest call (hidden by key_lengths): every row's queries
               start at key Q, so one q_offset serves the batch and each row attends to exactly the keys
               it would see alone (`StepScheduler._forward_merged`)
    step k+1   A commits and asks again, B appends a token and asks again, C finished -> leaves at once;
               D was queued -> its first call joins this step

Rows are resumed one at a time (`_resume`): after a merged call, each row runs until it asks for its next
call or finishes before the next row is let go, so only one row thread is ever runnable and the rows'
Python work never contends for the GIL.

A row therefore computes what it computes alone: for a deterministic rule (temperature 0) the output
of a request is the same whether it was decoded alone or alongside others, and with a seed a sampled
output is the same too (each row has its own generator, seeded from its request; a row of a RowSlots draws
from it exactly what it draws alone).

Which calls share a forward: all of them but calls the mask cannot shift exactly (`merge_key`: a
block-causal model's calls only by whole blocks), and padding a 1-column AR step to a 64-column canvas
costs more than a call of its own, so the calls of a step are split by width where that is cheaper
(`partition_by_width`). Requests join at step boundaries (a new row's first call joins the next step)
and leave at once; a row whose committed text settles a stop string ends there (`StopWatch`). Limits:
`max_rows` decodes run at once, `max_queue` more may wait; beyond that `submit` raises `QueueFull` (the
server answers 429).
"""
from __future__ import annotations

import collections
import contextlib
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch

from inference.ancestral_rows import AncestralRows
from inference.api import (Completion, DecodeOptions, StepInfo, block_alignment, commit_rule, completion_from_ids,
                           encode_requests, generate_with_stats, model_kind)
from inference.ar_decoding import ARRows
from inference.confidence_rows import ConfidenceRows
from kernels.attention import AttentionMask
from models.diffusion import NoiseSchedule


class QueueFull(Exception):
    """More rows are waiting than the scheduler may hold (backpressure: answer 429)."""


class ShuttingDown(Exception):
    """The scheduler is draining and takes no new work (answer 503)."""


class Cancelled(Exception):
    """The row was cancelled (its client left, or the server is shutting down)."""


@dataclass
class RowSpec:
    """One decode: a prompt, how many tokens, and the options it is decoded with (already resolved)."""

    prompt: str
    max_new_tokens: int
    options: DecodeOptions
    stop: tuple[str, ...] = ()  # stop strings: the decode ends once its committed text settles one (`StopWatch`)
    report_steps: bool = True  # send a "step" event after every step (streamed requests); False saves that work


class _StopReached(Exception):
    """Raised from a row's step hook to end its decode: its committed text holds a stop string."""

    def __init__(self, ids: list[int], text: str):
        super().__init__()
        self.ids, self.text = ids, text


class StopWatch:
    """Ends a row's decode as soon as the text it has committed holds a stop string for good.

    The committed text is the generated region up to its first still-masked position (AR: every token
    so far), cut at EOT like the final text. Committed tokens never change, so the text the full decode
    would return starts with it. The first stop string in it is the one the full text is cut at once
    no other stop string could still start before it and end in the uncommitted part: when
    len(committed) >= first + longest stop - 1 (or nothing more will come: EOT). AR rows are checked
    after every token; block decoding commits left to right, so its committed text grows at the latest
    when a block is finished (at block boundaries). The cut text is then exactly the full decode's,
    and the rows stop taking model calls."""

    def __init__(self, stop: tuple[str, ...], tokenizer, stop_at_eot: bool):
        self.stop, self.tokenizer = stop, tokenizer
        self.mask_id = getattr(tokenizer, "mask_id", None)
        self.eot_id = tokenizer.eot_id if stop_at_eot else None
        self.longest = max((len(s) for s in stop), default=0)

    def check(self, ids: list[int]) -> None:
        if not self.stop:
            return
        if self.mask_id in ids:
            ids = ids[:ids.index(self.mask_id)]
        final = self.eot_id is not None and self.eot_id in ids  # nothing after EOT counts
        if final:
            ids = ids[:ids.index(self.eot_id)]
        text = self.tokenizer.decode(ids)
        complete = text.rstrip("\ufffd")  # a character whose bytes are not all committed yet is not text yet
        hits = [complete.find(s) for s in self.stop if s in complete]
        if hits and (final or len(complete) >= min(hits) + self.longest - 1):
            raise _StopReached(ids, text)


@dataclass(eq=False)
class _Call:
    """One pending `hidden_states` call of a row's decoder."""

    idx: torch.Tensor  # (R, W) ids of the fed columns
    mask: AttentionMask
    past_kv: Optional[list]
    positions: Optional[torch.Tensor]  # (R, W)
    done: threading.Event = field(default_factory=threading.Event)
    result: Optional[tuple] = None
    error: Optional[BaseException] = None


class Row:
    """A running (or waiting) decode. `on_event(kind, payload)` is called from the row's thread with
    ("step", StepInfo) after each decoding step, then ("done", Completion) or ("error", exception)."""

    def __init__(self, spec: RowSpec, on_event: Callable[[str, object], None]):
        self.spec = spec
        self.on_event = on_event
        self.cancelled = False
        self.call: Optional[_Call] = None
        self.enqueued_at = time.perf_counter()
        self.kind = ""  # which of the scheduler's RowSlots holds it (`StepScheduler._rows_kind`)
        self.slot: Optional[int] = None  # its slot there; None: a row with a thread of its own
        self.prompt_ids: list[int] = []  # rows of RowSlots: what the thread's decoder would hold
        self.started = 0.0
        self.watch: Optional[StopWatch] = None
        self.strategy = ""


def _tell(row: Row, kind: str, payload) -> None:
    """The row's last event: a client whose callback fails now (its server loop closed) has nobody to tell,
    and the rows beside it go on."""
    try:
        row.on_event(kind, payload)
    except Exception:  # noqa: BLE001
        pass


class RowModel:
    """What a row's decoder sees as its model: the real model's config and output layer, but every
    `hidden_states` call goes through the scheduler. Mode switches are no-ops (the real model is shared
    by every row and stays in eval mode)."""

    training = False

    def __init__(self, scheduler: "StepScheduler", row: Row):
        self._scheduler, self._row = scheduler, row
        self._model = scheduler.model
        self.config, self.lm_head = self._model.config, self._model.lm_head

    def parameters(self):
        return self._model.parameters()

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def hidden_states(self, idx, mask=None, past_kv=None, positions=None):
        return self._scheduler._hidden_states(self._row, _Call(idx, mask, past_kv, positions))


class StepScheduler:
    """Runs rows' decoders in lockstep, one merged model call per step (see the module docstring).

    model must be in eval mode on its device; `autocast` is a context factory the model calls run in
    (e.g. bf16 on GPU). Counters for /metrics: `calls`, `row_calls`, `rows_per_call` (a histogram)."""

    def __init__(self, model, tokenizer, max_rows: int = 64, max_queue: int = 256,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 step_delay_s: float = 0.0, call_overhead_tokens: float = 16.0):
        if max_rows < 1 or max_queue < 0:
            raise ValueError(f"max_rows must be >= 1 and max_queue >= 0, got {max_rows}, {max_queue}")
        self.model, self.tokenizer = model, tokenizer
        self.max_rows, self.max_queue = max_rows, max_queue
        self.autocast = autocast
        self.step_delay_s = step_delay_s  # demos (watch a canvas fill in) and tests: pause before each call
        self._cond = threading.Condition()
        self._waiting: collections.deque[Row] = collections.deque()
        self._running: set[Row] = set()
        self._accepting = True
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        # metrics (read without the lock: ints are replaced atomically)
        self.calls = 0  # merged model calls (steps)
        self.row_calls = 0  # sum over calls of the rows in them
        self.rows_per_call = collections.Counter()  # rows in a call -> number of such calls
        self.forward_s = 0.0  # time spent in model calls
        self.cached_row_calls = 0  # rows that came with a KV cache (queries after column 0)
        self.mixed_past_calls = 0  # merged calls whose rows had past KV of different lengths
        self.row_sets: dict = {}  # kind -> RowSlots (AncestralRows, ConfidenceRows, ARRows), created on first use
        self._by_slot: dict[tuple, Row] = {}  # (kind, slot) -> the row
        # a separate model call costs about what this many extra row-columns do; partition_by_width uses it
        # to decide when padding a short call to a wide one is cheaper than a call of its own. It depends
        # on the device: `measure_call_overhead` (the server measures it at startup) found ~16 on a CPU
        # for the quickstart model (0.45 ms for a 1x1 call, +0.03 ms per row-column); on a GPU, where a
        # call is mostly kernel launches, it is in the thousands: merge everything
        self.call_overhead_tokens = call_overhead_tokens

    # ------------------------------------------------------------------ the client side
    @property
    def queued(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._running)

    def start(self) -> "StepScheduler":
        self._thread = threading.Thread(target=self._loop, name="step-scheduler", daemon=True)
        self._thread.start()
        return self

    def submit(self, specs: list[RowSpec], on_event: Callable[[int, str, object], None]) -> list[Row]:
        """Queue the rows of one request (all or none). on_event(i, kind, payload) for row i."""
        with self._cond:
            if not self._accepting:
                raise ShuttingDown("the server is shutting down and takes no new requests")
            free = self.max_queue + self.max_rows - len(self._running) - len(self._waiting)
            if len(specs) > free:
                raise QueueFull(f"the server is at capacity ({len(self._running)} rows decoding, "
                                f"{len(self._waiting)} queued, room for {max(free, 0)} more; this request "
                                f"needs {len(specs)}); retry later")
            rows = [Row(s, (lambda kind, payload, i=i: on_event(i, kind, payload))) for i, s in enumerate(specs)]
            self._waiting.extend(rows)
            self._cond.notify_all()
        return rows

    def cancel(self, rows: list[Row]) -> None:
        """Stop these rows at their next step (or drop them from the queue); frees their slots."""
        with self._cond:
            for row in rows:
                row.cancelled = True
            self._cond.notify_all()

    def stop(self, grace_s: float = 10.0) -> None:
        """Take no new rows, let the running and queued ones finish for up to grace_s, cancel the rest."""
        deadline = time.monotonic() + grace_s
        with self._cond:
            self._accepting = False
            while (self._running or self._waiting) and time.monotonic() < deadline:
                self._cond.wait(timeout=max(0.0, min(0.1, deadline - time.monotonic())))
            for row in self._running:
                row.cancelled = True
            while self._waiting:  # never started: tell their clients now
                row = self._waiting.popleft()
                row.cancelled = True
                _tell(row, "error", Cancelled())
            self._cond.notify_all()
            while self._running and time.monotonic() < deadline + 5.0:
                self._cond.wait(timeout=0.1)
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    # ------------------------------------------------------------------ the row side (row threads)
    def _hidden_states(self, row: Row, call: _Call):
        with self._cond:
            if row.cancelled:
                raise Cancelled()
            row.call = call
            self._cond.notify_all()
        call.done.wait()
        if call.error is not None:
            raise call.error
        return call.result

    def _run_row(self, row: Row) -> None:
        spec = row.spec
        watch = StopWatch(spec.stop, self.tokenizer, spec.options.stop_at_eot)
        progress = {"steps": 0, "nfe": 0}
        t0 = time.perf_counter()

        def on_step(info: StepInfo):
            if row.cancelled:
                raise Cancelled()
            progress["steps"] += 1
            progress["nfe"] = info.nfe[0]
            if spec.report_steps:
                row.on_event("step", info)
            watch.check(info.token_ids[0])

        try:
            try:
                with self.autocast():
                    done: Completion = generate_with_stats(RowModel(self, row), self.tokenizer, [spec.prompt],
                                                           spec.max_new_tokens, options=spec.options,
                                                           on_step=on_step)[0]
            except _StopReached as hit:  # the decode ended early: its Completion is the committed text
                prompt_ids = encode_requests(self.model, self.tokenizer, [spec.prompt],
                                             [spec.max_new_tokens])[0].prompt_ids
                done = completion_from_ids(spec.prompt, prompt_ids, hit.ids, spec.options.strategy,
                                           progress["nfe"], progress["steps"], time.perf_counter() - t0,
                                           self.tokenizer, None)
            row.on_event("done", done)
        except BaseException as e:  # noqa: BLE001 - the row's client gets the error, the server lives on
            _tell(row, "error", e)
        finally:
            with self._cond:
                self._running.discard(row)
                row.call = None
                self._cond.notify_all()

    # ------------------------------------------------------------------ the scheduler thread
    def _admit(self) -> None:
        while self._waiting and len(self._running) < self.max_rows:
            row = self._waiting.popleft()
            if row.cancelled:
                _tell(row, "error", Cancelled())
                continue
            self._running.add(row)
            try:
                options = row.spec.options.for_model(self.model)
            except ValueError as e:  # options this model cannot decode: the row's client hears why
                self._running.discard(row)
                _tell(row, "error", e)
                continue
            kind = self._rows_kind(options)
            if kind is not None:
                self._add_to_rows(row, kind, options)
                continue
            threading.Thread(target=self._run_row, args=(row,), name="row", daemon=True).start()
            self._resume(row)  # its prompt is encoded and its first call posted before the next row starts

    # ------------------------------------------------------------------ rows decoded as RowSlots
    def _rows_kind(self, options: DecodeOptions) -> Optional[str]:
        """Which RowSlots decodes these options (resolved for the model), or None (a thread of its own). Over the whole canvas of a
        bidirectional model, ancestral sampling (the MDLM default) runs in AncestralRows and topk / random /
        threshold in ConfidenceRows; AR, with its KV cache (the default) or without, in ARRows. Block-wise
        rules (and every rule of a block-causal model: block by block, with its KV cache) run in a thread each."""
        if model_kind(self.model) == "ar":
            return "ar"
        if block_alignment(self.model) or options.strategy == "blocks":
            return None
        return "ancestral" if options.strategy == "ancestral" else "confidence"

    def _row_set(self, kind: str):
        """The RowSlots of this kind, created on first use (max_rows rows of the model's context)."""
        if kind not in self.row_sets:
            tok, size = self.tokenizer, (self.max_rows, self.model.config.block_size)
            if kind == "ar":
                self.row_sets[kind] = ARRows(self.model, tok.vocab_size, *size)
            else:
                kind_class = AncestralRows if kind == "ancestral" else ConfidenceRows
                self.row_sets[kind] = kind_class(self.model, tok.mask_id, tok.vocab_size, *size)
        return self.row_sets[kind]

    def _add_to_rows(self, row: Row, kind: str, options: DecodeOptions) -> None:
        """Give the row a slot in the RowSlots of its kind, with what generate_with_stats would decode it with
        alone: its prompt, its sampler, a generator seeded with its seed; ancestral: the default of L time
        steps and its schedule; topk / random / threshold: its commit rule; AR: EOT as its stop token when
        stop_at_eot."""
        spec = row.spec
        try:
            rows = self._row_set(kind)
            prompt_ids = encode_requests(self.model, self.tokenizer, [spec.prompt], [spec.max_new_tokens])[0].prompt_ids
            generator = torch.Generator(device=rows.device).manual_seed(options.seed)
            n, sampler = spec.max_new_tokens, options.sampler()
            if kind == "ar":
                stop_id = self.tokenizer.eot_id if options.stop_at_eot else None
                row.slot = rows.add(prompt_ids, n, sampler, generator, stop_id, options.kv_cache)
            elif kind == "ancestral":
                row.slot = rows.add(prompt_ids, n, options.steps or n, NoiseSchedule(options.schedule), sampler, generator)
            else:
                rule = commit_rule(options.strategy, options.steps, options.tokens_per_step, options.threshold, None)
                row.slot = rows.add(prompt_ids, n, rule, sampler, generator)
        except BaseException as e:  # noqa: BLE001 - the row's client gets the error, the server lives on
            self._running.discard(row)
            _tell(row, "error", e)
            return
        row.kind, row.prompt_ids, row.started = kind, prompt_ids, time.perf_counter()
        row.watch = StopWatch(spec.stop, self.tokenizer, options.stop_at_eot)
        row.strategy = options.strategy
        self._by_slot[kind, row.slot] = row

    def _leave_rows(self, row: Row, kind: str, payload) -> None:
        """The row leaves its RowSlots and the scheduler; its client gets (kind, payload). (_cond is
        re-entrant: the scheduler thread may call this holding it.)"""
        self.row_sets[row.kind].remove(row.slot)
        del self._by_slot[row.kind, row.slot]
        with self._cond:
            self._running.discard(row)
            self._cond.notify_all()
        _tell(row, kind, payload)

    def _rows_calls(self) -> dict[str, list[_Call]]:
        """This step's model calls of every RowSlots (prepare, its wide calls split by width where padding the
        short rows would cost more than a call: `partition_widths`), as calls the step can merge with others."""
        cfg = self.model.config
        split = lambda widths: partition_widths(widths, [1] * len(widths), self.call_overhead_tokens)  # noqa: E731
        return {kind: [_Call(c.idx, c.mask or AttentionMask(kind=cfg.attention, block_length=cfg.block_length),
                             c.past_kv, c.positions) for c in rows.prepare(split)]
                for kind, rows in self.row_sets.items() if rows.active}

    def _commit_rows(self, calls_of: dict[str, list[_Call]]) -> None:
        """Commit this step's tokens of every RowSlots; report steps, settle stop strings, finish rows."""
        failed = next((c.error for calls in calls_of.values() for c in calls if c.error is not None), None)
        if failed is not None:  # a model call failed: fail every row of this step
            self._fail_rows(failed)
            return
        for kind, calls in calls_of.items():
            rows = self.row_sets[kind]
            stepped, finished = rows.commit([c.result for c in calls])
            for slot, error in list(rows.failed.items()):  # rows that failed alone leave alone
                self._leave_rows(self._by_slot[kind, slot], "error", error)
            by_slot = {s: self._by_slot[kind, s] for s in stepped}
            watched = [s for s in stepped if by_slot[s].spec.report_steps or by_slot[s].spec.stop]
            read = sorted(set(watched) | set(finished))
            ids = dict(zip(read, rows.generated(read)))  # one host copy for every row that needs its ids
            for slot in stepped:
                self._report(by_slot[slot], rows.rows[slot], ids.get(slot), slot in finished)

    def _report(self, row: Row, state, ids: Optional[list[int]], finished: bool) -> None:
        """After a row's step: its step event, its stop strings, its completion once it is done. Whatever fails
        here (its client's callback, its text) fails this row alone."""
        if row.cancelled:
            return  # leaves at the top of the next step
        try:
            try:
                if ids is not None and row.spec.report_steps:
                    row.on_event("step", StepInfo([0], [ids], [state.nfe]))
                if ids is not None:
                    row.watch.check(ids)
            except _StopReached as hit:
                finished, ids = True, hit.ids
            if finished:
                completion = completion_from_ids(row.spec.prompt, row.prompt_ids, ids, row.strategy, state.nfe,
                                                 state.steps, time.perf_counter() - row.started, self.tokenizer,
                                                 row.watch.eot_id)
                self._leave_rows(row, "done", completion)
        except Exception as e:  # noqa: BLE001 - this row's failure is this row's
            if row.slot is not None and (row.kind, row.slot) in self._by_slot:
                self._leave_rows(row, "error", e)

    def _fail_rows(self, error: BaseException) -> None:
        """Every row of every RowSlots leaves with this error (its client gets it; the server goes on)."""
        for row in list(self._by_slot.values()):
            self._leave_rows(row, "error", error)

    def _drop_cancelled(self) -> None:
        """Cancelled rows leave now: a thread row waiting for its call gets Cancelled from it, a row of a
        RowSlots leaves its slot."""
        for row in list(self._running):
            if not row.cancelled:
                continue
            if row.slot is not None:
                self._leave_rows(row, "error", Cancelled())
            elif row.call is not None and not row.call.done.is_set():
                row.call.error = Cancelled()
                row.call.done.set()
                row.call = None

    def _resume(self, row: Row, call: Optional[_Call] = None) -> None:
        """Hand `call`'s result back to its row (or let a new row start) and wait until the row has posted
        its next call or finished. Rows thus run one at a time between model calls: a row's Python work
        (sampling, committing, its step hook) never competes for the GIL with another row's or with the
        scheduler's, which made 16 rows cost twice their work one by one (measured on CPU)."""
        with self._cond:
            if call is not None:
                call.done.set()
            self._cond.wait_for(lambda: row.call is not None or row not in self._running)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stop:
                        return
                    self._admit()
                    self._drop_cancelled()
                    threads = [r for r in self._running if r.slot is None]
                    ready = [r for r in threads if r.call is not None]
                    if self._running and len(ready) == len(threads):
                        break
                    self._cond.wait(timeout=0.5)
                batch = [(r, r.call) for r in ready]
                for r in ready:
                    r.call = None
            calls, rows_calls = [c for _, c in batch], {}
            if self._by_slot:
                try:
                    with torch.inference_mode():
                        rows_calls = self._rows_calls()
                except BaseException as e:  # noqa: BLE001 - fail these rows, keep serving
                    self._fail_rows(e)
            calls += [c for kind_calls in rows_calls.values() for c in kind_calls]
            if calls:
                if self.step_delay_s:
                    time.sleep(self.step_delay_s)
                try:
                    t0 = time.perf_counter()
                    with torch.inference_mode(), self.autocast():
                        self._forward(calls)
                    self.forward_s += time.perf_counter() - t0
                except BaseException as e:  # noqa: BLE001 - fail these rows, keep serving
                    for c in calls:
                        if c.result is None:
                            c.error = e
            if self._by_slot:
                try:
                    with torch.inference_mode(), self.autocast():
                        self._commit_rows(rows_calls)
                except BaseException as e:  # noqa: BLE001 - fail these rows, keep serving
                    self._fail_rows(e)
            for row, call in batch:
                self._resume(row, call)

    def _forward(self, calls: list[_Call]) -> None:
        """Run this step's calls: calls that can share a forward (`merge_key`) are partitioned by width
        (`partition_by_width`) and each part of two or more calls is one merged model call; a call alone
        in its part, or one the mask cannot merge exactly, runs as it is (its own mask, its past as the
        decoder holds it: nothing to pad or copy). Each call gets its own rows and columns back."""
        groups: dict[tuple, list[_Call]] = {}
        for c in calls:
            key = merge_key(c)
            if key is None:
                self._forward_alone(c)
            else:
                groups.setdefault(key, []).append(c)
        for group in groups.values():
            for part in partition_by_width(group, self.call_overhead_tokens):
                if len(part) == 1:
                    self._forward_alone(part[0])
                else:
                    self._forward_merged(part)

    def _forward_alone(self, c: _Call) -> None:
        c.result = self.model.hidden_states(c.idx, mask=c.mask, past_kv=c.past_kv, positions=c.positions)
        self._count([c])

    def _forward_merged(self, calls: list[_Call]) -> None:
        """One model call over calls whose past KV may have different lengths (see `merge_key`).

        With P_c the past length of call c and Q = max P_c, call c's past keys/values are LEFT-padded
        by d_c = Q - P_c (zeros at [0, d_c), hidden by key_starts) and its queries are RIGHT-padded to
        the widest call (hidden by key_lengths). Every call's queries then start at key index Q, the
        one q_offset of the batch, and row c's key i sits at d_c + i: a causal query at Q + j sees it
        iff d_c + i <= Q + j iff i <= P_c + j, as alone; block-causal likewise because d_c is a
        multiple of the block length (merge_key); bidirectional ignores q_offset. Positions are per
        row, so rotary / learned position vectors are the ones the row gets alone."""
        dev = calls[0].idx.device
        width = max(c.idx.size(1) for c in calls)
        q_off = max(c.mask.q_offset for c in calls)
        n_rows = sum(c.idx.size(0) for c in calls)
        idx = torch.zeros(n_rows, width, dtype=torch.long, device=dev)  # (N, W); filler id 0 is never attended
        positions = torch.zeros(n_rows, width, dtype=torch.long, device=dev)  # (N, W)
        key_starts = torch.zeros(n_rows, dtype=torch.long, device=dev)
        key_lengths = torch.zeros(n_rows, dtype=torch.long, device=dev)
        buf = None  # (2 L, N, H, Q, D): every layer's past keys and values, one copy per call (not 2 L)
        if q_off > 0:
            layers = next(c.past_kv for c in calls if c.past_kv is not None)
            k = layers[0][0]  # (R, H, P, D)
            buf = k.new_zeros(2 * len(layers), n_rows, k.size(1), q_off, k.size(3))
        spans, r = [], 0
        for c in calls:
            R, w = c.idx.shape
            P = c.mask.q_offset
            d = q_off - P  # left padding of this call's past
            idx[r:r + R, :w] = c.idx
            positions[r:r + R, :w] = (c.positions if c.positions is not None
                                      else torch.arange(P, P + w, device=dev)).expand(R, w)
            if c.mask.key_starts is not None:
                key_starts[r:r + R] = c.mask.key_starts
            key_starts[r:r + R] += d
            # alone, the call's keys end at P + w (its own queries): hide the columns it was padded with
            ends = c.mask.key_lengths if c.mask.key_lengths is not None else torch.full((R,), P + w, device=dev)
            key_lengths[r:r + R] = ends.clamp(max=P + w) + d
            if P > 0:
                buf[:, r:r + R, :, d:] = torch.stack([t for kv in c.past_kv for t in kv])
            spans.append((r, R, w))
            r += R
        past = None if buf is None else [(buf[2 * i], buf[2 * i + 1]) for i in range(buf.size(0) // 2)]
        m = calls[0].mask
        mask = AttentionMask(kind=m.kind, block_length=m.block_length, key_lengths=key_lengths,
                             key_starts=key_starts, q_offset=q_off)
        h, presents = self.model.hidden_states(idx, mask=mask, past_kv=past, positions=positions)  # (N, W, C)
        self._count(calls)
        for c, (r, R, w) in zip(calls, spans):
            c.result = (h[r:r + R, :w], [(k[r:r + R, :, :w], v[r:r + R, :, :w]) for k, v in presents])

    def _count(self, calls: list[_Call]) -> None:
        n_rows = sum(c.idx.size(0) for c in calls)
        self.calls += 1
        self.row_calls += n_rows
        self.rows_per_call[n_rows] += 1
        offsets = [c.mask.q_offset if c.mask is not None else 0 for c in calls]
        self.cached_row_calls += sum(c.idx.size(0) for c, q in zip(calls, offsets) if q > 0)
        # pasts of different lengths: calls with different offsets, or one call of ARRows whose rows' pasts
        # were right-aligned to the longest (the columns before a shorter one hidden by key_starts)
        if len(set(offsets)) > 1 or any(c.past_kv is not None and c.mask.key_starts is not None for c in calls):
            self.mixed_past_calls += 1


def merge_key(call: _Call) -> Optional[tuple]:
    """Calls with equal keys can share one forward exactly (`StepScheduler._forward_merged`); None: the
    call runs on its own. The past must be the q_offset columns of the mask (what ModelRunner passes).
    A block-causal mask sees blocks by key index, so calls are shifted only by multiples of the block:
    they merge when their past lengths agree modulo the block length."""
    m = call.mask
    past = 0 if call.past_kv is None else call.past_kv[0][0].size(2)
    if m is None or m.kind == "block_diffusion" or m.future_attention < 1.0 or m.q_offset != past:
        return None
    residue = past % m.block_length if m.kind == "block_causal" else 0
    return m.kind, m.block_length, residue


def partition_by_width(calls: list[_Call], overhead_tokens: float) -> list[list[_Call]]:
    """Split calls into parts, each one model call (`partition_widths` of their widths and rows)."""
    parts = partition_widths([c.idx.size(1) for c in calls], [c.idx.size(0) for c in calls], overhead_tokens)
    return [[calls[i] for i in part] for part in parts]


def partition_widths(widths: list[int], rows: list[int], overhead_tokens: float) -> list[list[int]]:
    """Split calls (call i: rows[i] rows of widths[i] columns) into parts, each one model call, minimising
    sum over parts of (rows x widest call + overhead_tokens): merging a 1-column AR step with a 64-column
    canvas would pay 64 columns for it, while a separate call costs a fixed overhead (kernel dispatch,
    Python) worth overhead_tokens row-columns. Returns the parts as lists of indices. Sorted by width, the
    best parts are contiguous runs: O(n^2) dynamic programming over at most max_rows calls."""
    order = sorted(range(len(widths)), key=lambda i: widths[i])
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[i]: cost of the first i calls (in width order)
    cut = [0] * (n + 1)
    for i in range(1, n + 1):
        n_rows = 0
        for j in range(i, 0, -1):  # the last part is order[j-1:i], its widest call is order[i-1]
            n_rows += rows[order[j - 1]]
            cost = best[j - 1] + n_rows * widths[order[i - 1]] + overhead_tokens
            if cost < best[i]:
                best[i], cut[i] = cost, j - 1
    parts, i = [], n
    while i > 0:
        parts.append(order[cut[i]:i])
        i = cut[i]
    return parts[::-1]


def device_synchronizer(device: torch.device) -> Callable[[], None]:
    """A function that waits for the work queued on `device`: the model's GPU, not the thread's current one
    (cuda:0 unless set), which a model on cuda:1 never touches; nothing to wait for on a CPU."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def measure_call_overhead(model, autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                          rows: int = 8, width: int = 0, repeats: int = 7,
                          clock: Callable[[], float] = time.perf_counter) -> float:
    """What one more model call costs, in row-columns of work: the time of a 1-row, 1-column call divided
    by the extra time per row-column of a `rows` x `width` call (width: the model's context), each the
    fastest of `repeats` timings (a shared machine is noisy upwards only). Random ids, the model's own
    mask; a few calls, well under a second on a CPU for the quickstart model. The result is capped at 1e6
    (calls whose time does not grow with their size: merge everything)."""
    device = next(model.parameters()).device
    width = width or model.config.block_size
    sync = device_synchronizer(device)

    def fastest(n_rows: int, n_cols: int) -> float:
        idx = torch.randint(0, model.config.vocab_size, (n_rows, n_cols), device=device)
        best = float("inf")
        with torch.inference_mode(), autocast():
            for i in range(repeats + 1):  # the first run warms up (and compiles, on a GPU)
                sync()
                t0 = clock()
                model.hidden_states(idx)
                sync()
                if i:
                    best = min(best, clock() - t0)
        return best

    one, many = fastest(1, 1), fastest(rows, width)
    per_column = max(many - one, 1e-9) / (rows * width - 1)
    return min(max(one / per_column, 1.0), 1e6)


def exact_cache(model) -> bool:
    """Whether a KV cache changes nothing for this model: causal (AR) and block-causal (BD3-LM) models
    never let a finished token see a later one, so its keys/values are final. A bidirectional model's
    prefix cache (Fast-dLLM, `blocks` only) is an approximation: the prefix would see the later blocks."""
    return model.config.attention in ("causal", "block_causal")


def server_options(options: DecodeOptions, model=None, kv_cache: Optional[bool] = None) -> DecodeOptions:
    """The options a served row decodes with: one row per decode, and the KV cache where it is exact
    (`exact_cache`: AR rows, block-causal blocks) unless kv_cache says otherwise; kv_cache=True on a
    bidirectional model opts into the approximate prefix cache of `blocks`. Without the model (and
    without kv_cache) no cache: exact for every model."""
    if kv_cache is None:
        kv_cache = model is not None and exact_cache(model)
    return replace(options, kv_cache=kv_cache, batch_size=1)
