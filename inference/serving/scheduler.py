"""Step-level continuous batching: many decodes, few model calls per step.

Serving is decoding plus a scheduler. Every row (one choice of one request) is a row of the scheduler's
`RowSlots` of its kind, the classes `generate` decodes with (`inference.api.DECODERS`): `AncestralRows`
(ancestral sampling), `ConfidenceRows` (topk, random, threshold, blocks), `ARRows` (AR), each row added
by `inference.api.add_request` exactly as `generate` adds a request, block rules and block-causal models
included (their blocks, their KV cache of the finished blocks, EOT ending a row at a finished block).
One thread, the scheduler's, runs every step:

    step k     prepare   every RowSlots returns its step's calls: its rows fed from column 0 (split by
                         width where padding the short ones costs more than a call: `partition_widths`),
                         and its rows with a KV cache after their cached pasts, right-aligned in one call
               run       each call is one model forward
               commit    every RowSlots commits all of its rows at once (one output layer and sampling per
                         sampler), reports each row's step, settles stop strings, finishes rows
    step k+1   finished rows have left at once; queued rows join (their first call joins this step)

    rows       A (topk, step 7 of 12)        B (ar, token 30, cached)        C (blocks, block 3, cached)
    calls      [a a a M a M] with the other  past 29 cols + [b] with the     past 16 cols + [c c M M M M M M]
               whole-canvas confidence rows  other AR steps                  with the other cached block rows

A row therefore computes what it computes alone: for a deterministic rule (temperature 0) the output of a
request is the same whether it was decoded alone or alongside others, and with a seed a sampled output is
the same too (each row has its own generator, seeded from its request, and draws from it exactly what it
draws alone).

Requests join at step boundaries and leave at once; a row whose committed text settles a stop string ends
there (`StopWatch`). Limits: `max_rows` decodes run at once, `max_queue` more may wait; beyond that `submit`
raises `QueueFull` (the server answers 429).
"""
from __future__ import annotations

import collections
import contextlib
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch

from inference.api import DECODERS, DecodeOptions, StepInfo, add_request, completion_from_ids, encode_requests, new_rows
from inference.batching import RowsCall


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
    """Raised by `StopWatch.check` to end a row's decode: its committed text holds a stop string."""

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


class Row:
    """A running (or waiting) decode. `on_event(kind, payload)` is called from the scheduler's thread with
    ("step", StepInfo) after each decoding step, then ("done", Completion) or ("error", exception)."""

    def __init__(self, spec: RowSpec, on_event: Callable[[str, object], None]):
        self.spec = spec
        self.on_event = on_event
        self.cancelled = False
        self.enqueued_at = time.perf_counter()
        self.kind: Optional[type] = None  # which of the scheduler's RowSlots holds it (its class)
        self.slot: Optional[int] = None  # its slot there
        self.prompt_ids: list[int] = []
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


class StepScheduler:
    """Steps every row of its RowSlots together, a few model calls per step (see the module docstring).

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
        self.calls = 0  # model calls
        self.row_calls = 0  # sum over calls of the rows in them
        self.rows_per_call = collections.Counter()  # rows in a call -> number of such calls
        self.forward_s = 0.0  # time spent in model calls
        self.cached_row_calls = 0  # rows that came with a KV cache (queries after column 0)
        self.mixed_past_calls = 0  # calls whose rows had past KV of different lengths
        self.row_sets: dict[type, object] = {}  # RowSlots class -> its rows, created on first use
        self._by_slot: dict[tuple, Row] = {}  # (kind, slot) -> the row
        # a separate model call costs about what this many extra row-columns do; partition_widths uses it
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

    # ------------------------------------------------------------------ the scheduler thread
    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stop:
                        return
                    self._admit()
                    self._drop_cancelled()
                    if self._by_slot:
                        break
                    self._cond.wait(timeout=0.5)
            self._step()

    def _step(self) -> None:
        """One step of every RowSlots: prepare, run the calls, commit. A failure of a prepare, a call or a
        commit fails the rows of this step (their clients hear why) and the server goes on."""
        try:
            with torch.inference_mode():
                calls = self._prepare()
            if self.step_delay_s:
                time.sleep(self.step_delay_s)
            t0 = time.perf_counter()
            with torch.inference_mode(), self.autocast():
                results = {kind: [self._run(c) for c in kind_calls] for kind, kind_calls in calls.items()}
            self.forward_s += time.perf_counter() - t0
            with torch.inference_mode(), self.autocast():
                self._commit(results)
        except BaseException as e:  # noqa: BLE001 - fail these rows, keep serving
            self._fail_rows(e)

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self.max_rows:
            row = self._waiting.popleft()
            if row.cancelled:
                _tell(row, "error", Cancelled())
                continue
            self._running.add(row)
            self._add(row)

    def _rows_of(self, strategy: str):
        """The RowSlots that decode this strategy, created on first use (max_rows rows of the model's context)."""
        kind = DECODERS[strategy]
        if kind not in self.row_sets:
            self.row_sets[kind] = new_rows(self.model, self.tokenizer, strategy, self.max_rows,
                                           self.model.config.block_size)
        return self.row_sets[kind]

    def _add(self, row: Row) -> None:
        """Give the row a slot in the RowSlots of its kind, as generate_with_stats adds it alone
        (`inference.api.add_request`: its prompt, its options, a generator seeded with its seed)."""
        spec = row.spec
        try:
            options = spec.options.for_model(self.model)  # options this model cannot decode: ValueError
            rows = self._rows_of(options.strategy)
            prompt_ids = encode_requests(self.model, self.tokenizer, [spec.prompt], [spec.max_new_tokens])[0].prompt_ids
            generator = torch.Generator(device=rows.device).manual_seed(options.seed)
            stop_id = self.tokenizer.eot_id if options.stop_at_eot else None
            row.slot = add_request(rows, options, prompt_ids, spec.max_new_tokens, generator, stop_id,
                                   default_steps=spec.max_new_tokens)
        except BaseException as e:  # noqa: BLE001 - the row's client gets the error, the server lives on
            self._running.discard(row)
            _tell(row, "error", e)
            return
        row.kind, row.prompt_ids, row.started = type(rows), prompt_ids, time.perf_counter()
        row.watch = StopWatch(spec.stop, self.tokenizer, options.stop_at_eot)
        row.strategy = options.strategy
        self._by_slot[row.kind, row.slot] = row

    def _leave(self, row: Row, kind: str, payload) -> None:
        """The row leaves its RowSlots and the scheduler; its client gets (kind, payload). (_cond is
        re-entrant: the scheduler thread may call this holding it.)"""
        self.row_sets[row.kind].remove(row.slot)
        del self._by_slot[row.kind, row.slot]
        with self._cond:
            self._running.discard(row)
            self._cond.notify_all()
        _tell(row, kind, payload)

    def _fail_rows(self, error: BaseException) -> None:
        """Every row of every RowSlots leaves with this error (its client gets it; the server goes on)."""
        for row in list(self._by_slot.values()):
            self._leave(row, "error", error)

    def _drop_cancelled(self) -> None:
        """Cancelled rows leave their slots now."""
        for row in list(self._by_slot.values()):
            if row.cancelled:
                self._leave(row, "error", Cancelled())

    def _prepare(self) -> dict[type, list[RowsCall]]:
        """This step's model calls of every RowSlots (prepare; calls from column 0 split by width where padding
        the short rows would cost more than a call: `partition_widths`)."""
        split = lambda widths: partition_widths(widths, [1] * len(widths), self.call_overhead_tokens)  # noqa: E731
        return {kind: rows.prepare(split) for kind, rows in self.row_sets.items() if rows.active}

    def _run(self, call: RowsCall) -> tuple:
        out = call.run(self.model)
        R = call.idx.size(0)
        self.calls += 1
        self.row_calls += R
        self.rows_per_call[R] += 1
        if call.past_kv is not None:
            self.cached_row_calls += R
            if call.mask.key_starts is not None:  # pasts of different lengths, right-aligned to the longest
                self.mixed_past_calls += 1
        return out

    def _commit(self, results: dict[type, list[tuple]]) -> None:
        """Commit this step's tokens of every RowSlots; report steps, settle stop strings, finish rows."""
        for kind, kind_results in results.items():
            rows = self.row_sets[kind]
            stepped, finished = rows.commit(kind_results)
            for slot, error in list(rows.failed.items()):  # rows that failed alone leave alone
                self._leave(self._by_slot[kind, slot], "error", error)
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
                self._leave(row, "done", completion)
        except Exception as e:  # noqa: BLE001 - this row's failure is this row's
            if (row.kind, row.slot) in self._by_slot:
                self._leave(row, "error", e)


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


def server_options(options: DecodeOptions, model=None, kv_cache: Optional[bool] = None) -> DecodeOptions:
    """The options a served row decodes with: one row per decode, and the KV cache where it is exact
    (`GPTConfig.exact_cache`: AR rows, block-causal blocks) unless kv_cache says otherwise; kv_cache=True on a
    bidirectional model opts into the approximate prefix cache of `blocks`. Without the model (and
    without kv_cache) no cache: exact for every model."""
    if kv_cache is None:
        kv_cache = model is not None and model.config.exact_cache
    return replace(options, kv_cache=kv_cache, batch_size=1)
