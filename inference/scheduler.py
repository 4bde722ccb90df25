"""Step-level continuous batching: many decodes, one model call per step.

Serving is decoding plus a scheduler. Each admitted row (one choice of one request) runs the ordinary
batch decoder, `inference.api.generate_with_stats`, on its own one-row canvas in its own thread, so
every rule (ancestral, topk, random, threshold, blocks, ar), its commit logic, its random generator and
its stop rule are the decoder's own: the scheduler adds no decoding logic. What it changes is the model
the decoder sees. A `RowModel` stands in for the real model: when a decoder asks for hidden states it
hands the call to the scheduler and waits. The scheduler waits until every running row has either
asked for its next call or finished, then runs ONE forward over all of them and hands each row its
slice back:

    step k     row A (topk, step 7 of 12)   row B (ar, token 3)   row C (threshold, step 1)
               canvas [a a a M a M]          [b b b b]             [c c M M M M M M]
    merged     one (3, W) batch, each row right-padded to the widest call; key_lengths hide the
               padding, so each row attends to exactly the keys it would see alone
    step k+1   A commits and asks again, B appends a token and asks again, C finished -> leaves at once;
               D was queued -> its first call joins this step

A row therefore computes what it computes alone: for a deterministic rule (temperature 0) the output
of a request is the same whether it was decoded alone or alongside others, and with a seed a sampled
output is the same too (each row has its own generator, seeded from its request).

Requests join at step boundaries (a new row's first call joins the next merged call) and leave at once.
Every call of the server's decoders starts at column 0 without a KV cache (the server decodes with
kv_cache=False), so any mix of rows merges; a call that does carry a KV cache is run on its own in the
same step. Limits: `max_rows` decodes run at once, `max_queue` more may wait; beyond that `submit`
raises `QueueFull` (the server answers 429).
"""
from __future__ import annotations

import collections
import contextlib
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch

from inference.api import Completion, DecodeOptions, StepInfo, generate_with_stats
from kernels.attention import AttentionMask


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
                 step_delay_s: float = 0.0):
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
                row.on_event("error", Cancelled())
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

        def on_step(info: StepInfo):
            if row.cancelled:
                raise Cancelled()
            row.on_event("step", info)

        try:
            with self.autocast():
                done: Completion = generate_with_stats(RowModel(self, row), self.tokenizer, [spec.prompt],
                                                       spec.max_new_tokens, options=spec.options, on_step=on_step)[0]
            row.on_event("done", done)
        except BaseException as e:  # noqa: BLE001 - the row's client gets the error, the server lives on
            row.on_event("error", e)
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
                row.on_event("error", Cancelled())
                continue
            self._running.add(row)
            threading.Thread(target=self._run_row, args=(row,), name="row", daemon=True).start()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stop:
                        return
                    self._admit()
                    for row in self._running:  # a cancelled row waiting for its call leaves now
                        if row.cancelled and row.call is not None and not row.call.done.is_set():
                            row.call.error = Cancelled()
                            row.call.done.set()
                            row.call = None
                    ready = [r for r in self._running if r.call is not None]
                    if self._running and len(ready) == len(self._running):
                        break
                    self._cond.wait(timeout=0.5)
                calls = [r.call for r in ready]
                for r in ready:
                    r.call = None
            if self.step_delay_s:
                time.sleep(self.step_delay_s)
            try:
                t0 = time.perf_counter()
                with torch.inference_mode(), self.autocast():
                    self._forward(calls)
                self.forward_s += time.perf_counter() - t0
            except BaseException as e:  # noqa: BLE001 - fail these rows, keep serving
                for c in calls:
                    if not c.done.is_set():
                        c.error = e
                        c.done.set()

    def _forward(self, calls: list[_Call]) -> None:
        """One model call over every call without a KV cache (right-padded to the widest), plus one call
        each for calls that carry a cache. Each call gets its own rows and columns back."""
        plain = [c for c in calls if c.past_kv is None and c.mask is not None and c.mask.q_offset == 0]
        merged = {id(c) for c in plain}
        for c in calls:
            if id(c) not in merged:
                c.result = self.model.hidden_states(c.idx, mask=c.mask, past_kv=c.past_kv, positions=c.positions)
                self._count(c.idx.size(0))
                c.done.set()
        if not plain:
            return
        dev = plain[0].idx.device
        width = max(c.idx.size(1) for c in plain)
        n_rows = sum(c.idx.size(0) for c in plain)
        idx = torch.zeros(n_rows, width, dtype=torch.long, device=dev)  # (N, W); filler id 0 is never attended
        positions = torch.zeros(n_rows, width, dtype=torch.long, device=dev)  # (N, W)
        key_starts = torch.zeros(n_rows, dtype=torch.long, device=dev)
        key_lengths = torch.zeros(n_rows, dtype=torch.long, device=dev)
        spans, r = [], 0
        for c in plain:
            R, w = c.idx.shape
            idx[r:r + R, :w] = c.idx
            positions[r:r + R, :w] = (c.positions if c.positions is not None
                                      else torch.arange(w, device=dev)).expand(R, w)
            if c.mask.key_starts is not None:
                key_starts[r:r + R] = c.mask.key_starts
            # alone, the call's keys end at its own width w: hide the columns it was padded with
            ends = c.mask.key_lengths if c.mask.key_lengths is not None else torch.full((R,), w, device=dev)
            key_lengths[r:r + R] = ends.clamp(max=w)
            spans.append((r, R, w))
            r += R
        m = plain[0].mask
        mask = AttentionMask(kind=m.kind, block_length=m.block_length, key_lengths=key_lengths,
                             key_starts=key_starts)
        h, presents = self.model.hidden_states(idx, mask=mask, positions=positions)  # (N, W, C)
        self._count(n_rows)
        for c, (r, R, w) in zip(plain, spans):
            c.result = (h[r:r + R, :w], [(k[r:r + R, :, :w], v[r:r + R, :, :w]) for k, v in presents])
            c.done.set()

    def _count(self, n_rows: int) -> None:
        self.calls += 1
        self.row_calls += n_rows
        self.rows_per_call[n_rows] += 1


def server_options(options: DecodeOptions) -> DecodeOptions:
    """The options a served row decodes with: no KV cache (every call starts at column 0, so rows at any
    point of their decodes merge into one call) and one row per decode."""
    return replace(options, kv_cache=False, batch_size=1)
