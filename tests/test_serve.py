"""Specification of the server (inference/serving/app.py) and its scheduler (inference/serving/scheduler.py).

Tiny random models (2 layers, 32 wide, context 64) served in float64 by real `python -m inference.serve`
subprocesses on free loopback ports, driven by the official `openai` client and raw HTTP. Every server a
test starts is stopped by its fixture, even when the test fails.
"""
import fcntl
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import httpx
import hypothesis
import hypothesis.strategies as st
import openai
import pytest
import torch

from common.ports import free_port
from inference.ancestral_rows import AncestralRows
from inference.api import DecodeOptions, generate_with_stats
from inference.ar_decoding import ARRows
from inference.loading import load_model
from inference.serving.scheduler import RowSpec, StepScheduler, server_options
from models.gpt import GPT, GPTConfig
from models.tokenizer import PLACEHOLDER
from models.weights import save_consolidated
from tests.tiny_models import TOK

REPO = Path(__file__).resolve().parents[1]
KEY = "test-key-123"


def export_sharp(out_dir, attention, objective) -> Path:
    """`tiny` (a random model whose tokens depend on their context) saved as our consolidated export."""
    info = {"model": tiny(attention).config.to_dict(), "objective": {"name": objective, "schedule": "loglinear"},
            "tokenizer": TOK.to_meta(), "mask_id": TOK.mask_id, "eot_id": TOK.eot_id}
    save_consolidated(tiny(attention).float().state_dict(), info, out_dir)
    return Path(out_dir)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    return {"mdlm": export_sharp(root / "mdlm", "bidirectional", "mdlm"),
            "ar": export_sharp(root / "ar", "causal", "ar")}


class Server:
    """`python -m inference.serve` in a subprocess on a free loopback port; stop() always ends it."""

    def __init__(self, ckpt, *flags):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile()
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "inference.serve", "--ckpt", str(ckpt), "--port",
                                      str(self.port), "--dtype", "float64", "--threads", "1", *flags],
                                     cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server did not answer /health within 90 s:\n{self.output()}")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode("utf-8", "replace")

    def client(self, key="none") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def metric(self, name: str, headers=None) -> float:
        text = httpx.get(self.url + "/metrics", headers=headers, timeout=10).text
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
                   or line.startswith(name + "{"))

    def batch_rows(self) -> dict[str, float]:
        """The server's histogram of rows per model call: {upper bound ("1", "2", "4", ..., "+Inf"): calls}."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return {line.split('le="')[1].split('"')[0]: float(line.split()[-1]) for line in text.splitlines()
                if line.startswith("diffusiongpt_batch_rows_bucket{")}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def mdlm_server(model_dirs):
    server = Server(model_dirs["mdlm"], "--max_rows", "16")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def ar_server(model_dirs):
    server = Server(model_dirs["ar"])
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def small_server(model_dirs):
    """Two rows at a time, two waiting, an API key, and slow steps (so that a request can be left mid-way)."""
    server = Server(model_dirs["mdlm"], "--max_rows", "2", "--max_queue", "2", "--api-key", KEY,
                    "--step_delay_s", "0.05", "--call_overhead_tokens", "1000")
    try:
        yield server
    finally:
        server.stop()


# ----------------------------------------------------------------------------- the scheduler alone
def tiny(attention, block_length=0):
    """A random tiny model whose predictions depend on its context: GPT's init (std 0.02) gives nearly
    flat logits that no small error in the attention would change, so the weights are scaled up (x8)
    until a key seen or missed changes the tokens (a merged call that got the mask wrong fails)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=TOK.padded_vocab_size, n_layer=2, n_head=2, n_embd=32,
                          attention=attention, block_length=block_length)).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    return model


ROW_CASES = [("ancestral", {}), ("topk", dict(tokens_per_step=2)), ("random", dict(tokens_per_step=3)),
             ("threshold", dict(threshold=0.05)), ("blocks", dict(block_length=8)),
             ("blocks", dict(block_length=8, block_rule="threshold", threshold=0.1))]
# bidirectional blocks with the (approximate, opt-in) prefix cache; AR with and without its cache
CASES = {"bidirectional": [(s, k, None) for s, k in ROW_CASES] + [("blocks", dict(block_length=8), True)],
         "block_causal": [(s, k, None) for s, k in ROW_CASES],  # None: the server's default, cache on
         "causal": [("ar", {}, None), ("ar", {}, False)]}


def decode_together(model, specs, max_rows, tokenizer=TOK):
    """Every spec through one StepScheduler (max_rows at a time, the rest join as rows finish)."""
    scheduler = StepScheduler(model, tokenizer, max_rows=max_rows, max_queue=len(specs)).start()
    got, finished = {}, threading.Event()

    def on_event(i, kind, payload):
        if kind in ("done", "error"):
            got[i] = payload
            if len(got) == len(specs):
                finished.set()
    try:
        scheduler.submit(specs, on_event)
        assert finished.wait(60), "the scheduler did not finish"
    finally:
        scheduler.stop(1.0)
    return got, scheduler


@pytest.mark.parametrize("attention", ["bidirectional", "block_causal", "causal"])
def test_rows_decoded_together_equal_each_row_decoded_alone(attention):
    """Every rule, greedy and sampled (own seed per row), with the KV cache where the server uses it:
    merged calls (rows at different steps, past KV of different lengths, rows joining mid-decode as
    others finish) change nothing."""
    model = tiny(attention, block_length=4 if attention == "block_causal" else 0)
    specs = []
    for k, (strategy, knobs, kv_cache) in enumerate(CASES[attention]):
        for temperature in (0, 0.9):
            for prompt, n in [("the cat", 12), ("hello world, how", 20), ("xyz", 9)]:
                options = DecodeOptions(strategy=strategy, temperature=temperature, seed=7 + k, **knobs)
                specs.append(RowSpec(prompt, n, server_options(options.for_model(model), model, kv_cache)))
                # the server's default: the cache where it is exact (AR, block-causal), not on bidirectional
                default = attention != "bidirectional"
                assert specs[-1].options.kv_cache == (default if kv_cache is None else kv_cache)
    alone = [generate_with_stats(model, TOK, [s.prompt], s.max_new_tokens, options=s.options)[0] for s in specs]
    got, scheduler = decode_together(model, specs, max_rows=6)
    for i, want in enumerate(alone):
        assert getattr(got[i], "token_ids", got[i]) == want.token_ids, f"row {i} ({specs[i].options})"
        assert got[i].nfe == want.nfe
    assert scheduler.row_calls > scheduler.calls, "rows never shared a model call"
    assert max(scheduler.rows_per_call) <= 6
    assert scheduler.cached_row_calls > 0, "no row decoded with its KV cache"
    assert scheduler.mixed_past_calls > 0, "rows with past KV of different lengths never shared a call"


def test_rows_run_one_at_a_time_between_model_calls():
    """Every row's step (sampling, committing, its step hook) runs in the scheduler's one thread, so a row's
    own work never runs beside another row's: 16 rows contending for the GIL cost twice their work done one
    by one. Every step hook here lingers 2 ms inside; had two rows been let go together, their hooks would
    have overlapped."""
    model = tiny("bidirectional")
    inside, most, lock, finished = [0], [0], threading.Lock(), threading.Event()
    blocks = DecodeOptions(strategy="blocks", block_length=4, temperature=0)  # rows of blocks, at their own steps
    specs = [RowSpec("the cat", 8, server_options(blocks.for_model(model))) for _ in range(8)]
    done = []

    def on_event(i, kind, payload):
        if kind == "step":
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(0.002)
            with lock:
                inside[0] -= 1
        else:
            done.append(kind)
            if len(done) == len(specs):
                finished.set()
    scheduler = StepScheduler(model, TOK, max_rows=8, max_queue=8).start()
    try:
        scheduler.submit(specs, on_event)
        assert finished.wait(60), "the scheduler did not finish"
    finally:
        scheduler.stop(1.0)
    assert done == ["done"] * len(specs)
    assert scheduler.row_calls > scheduler.calls  # the rows did share model calls
    assert most[0] == 1, f"{most[0]} rows ran their step at the same time"


@pytest.mark.parametrize("attention", ["bidirectional", "causal"])
def test_rows_of_the_default_rule_share_one_output_layer_and_sampling_per_step(monkeypatch, attention):
    """Rows decoded by ancestral sampling (the MDLM default) or AR with its cache (the AR default) run in the
    scheduler's AncestralRows / ARRows, not in a thread each: a step predicts the tokens of all its rows at
    once (one output layer and sampling per sampler, not one per row), and each equals its row alone."""
    import inference.batching as batching
    model = tiny(attention)
    per_step, predicted = [], [0]
    kind = ARRows if attention == "causal" else AncestralRows
    predict, commit = batching.predict_tokens, kind.commit

    def counting_predict(*args, **kwargs):
        predicted[0] += 1
        return predict(*args, **kwargs)

    def counting_commit(self, results):
        before = predicted[0]
        stepped, finished = commit(self, results)
        per_step.append((len(stepped), predicted[0] - before))
        return stepped, finished
    monkeypatch.setattr(batching, "predict_tokens", counting_predict)
    monkeypatch.setattr(kind, "commit", counting_commit)
    options = server_options(DecodeOptions(temperature=0.9, top_k=20).for_model(model), model)  # its default rule
    specs = [RowSpec(p, n, replace(options, seed=i)) for i, (p, n) in enumerate([("the cat", 12), ("a", 20)] * 4)]
    alone = [generate_with_stats(model, TOK, [s.prompt], s.max_new_tokens, options=s.options)[0] for s in specs]
    got, scheduler = decode_together(model, specs, max_rows=8)
    assert [got[i].token_ids for i in range(len(specs))] == [a.token_ids for a in alone]
    steps_of_many = [calls for rows, calls in per_step if rows >= 4]
    assert steps_of_many and all(calls == 1 for calls in steps_of_many), per_step
    assert not any(t.name == "row" for t in threading.enumerate())


def test_ancestral_rows_stream_their_canvas_stop_at_a_stop_string_and_leave_when_cancelled():
    model = tiny("bidirectional")
    options = server_options(DecodeOptions(strategy="ancestral", temperature=0, stop_at_eot=False,
                                           seed=1).for_model(model))
    full = generate_with_stats(model, TOK, ["the cat"], 30, options=options)[0]
    at = next(i for i in range(5, 25) if full.text.index(full.text[i:i + 2]) == i)  # a pair first seen at 5+
    stop = full.text[at:at + 2]
    specs = [RowSpec("the cat", 30, options), RowSpec("the cat", 30, options, stop=(stop,), report_steps=False),
             RowSpec("the cat", 30, options)]
    scheduler = StepScheduler(model, TOK, max_rows=3, max_queue=0).start()
    canvases, ends, finished, submitted, rows = {0: [], 1: [], 2: []}, {}, threading.Event(), threading.Event(), []

    def on_event(i, kind, payload):
        if kind == "step":
            canvases[i].append(payload.token_ids[0])
            if i == 2:
                submitted.wait(10)
                scheduler.cancel([rows[2]])  # its client left after one step
            return
        ends[i] = (kind, payload)
        if len(ends) == 3:
            finished.set()
    try:
        rows += scheduler.submit(specs, on_event)
        submitted.set()
        assert finished.wait(60), "the scheduler did not finish"
    finally:
        scheduler.stop(1.0)
    # streamed: the canvas fills in (MASK where nothing is committed yet) and ends as the completion
    masked = [ids.count(TOK.mask_id) for ids in canvases[0]]
    assert len(masked) > 1 and masked == sorted(masked, reverse=True) and masked[-1] == 0, masked
    assert ends[0][0] == "done" and canvases[0][-1] == ends[0][1].token_ids == full.token_ids
    # a stop string: the decode ended once its committed text held it for good, with fewer calls
    kind, cut = ends[1]
    assert kind == "done" and stop in cut.text and full.token_ids[:len(cut.token_ids)] == cut.token_ids
    assert cut.nfe <= full.nfe and not canvases[1]  # report_steps=False: no step events
    # cancelled after its first step: it leaves at once and its client hears so
    assert ends[2][0] == "error" and type(ends[2][1]).__name__ == "Cancelled" and len(canvases[2]) == 1
    assert scheduler.active == 0


def test_a_failing_model_call_fails_its_rows_and_the_scheduler_goes_on():
    model = tiny("bidirectional")
    real, calls = model.hidden_states, [0]

    def fails_the_third_call(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("device lost")
        return real(*args, **kwargs)
    model.hidden_states = fails_the_third_call
    options = {s: server_options(DecodeOptions(strategy=s, temperature=0).for_model(model)) for s in ("ancestral", "blocks")}
    scheduler = StepScheduler(model, TOK, max_rows=4, max_queue=4, call_overhead_tokens=1000).start()
    try:  # an ancestral row (in the scheduler's AncestralRows) and a blocks row (in its ConfidenceRows)
        for specs in ([RowSpec("the cat", 12, options["ancestral"]), RowSpec("the cat", 12, options["blocks"])],
                      [RowSpec("a", 9, options["ancestral"])]):
            ends, finished = {}, threading.Event()

            def on_event(i, kind, payload):
                if kind != "step":
                    ends[i] = (kind, payload)
                    if len(ends) == len(specs):
                        finished.set()
            scheduler.submit(specs, on_event)
            assert finished.wait(60), "the scheduler did not finish"
            if len(specs) == 2:  # the third call failed a step of both rows: both hear why they failed
                assert all(k == "error" and "device lost" in str(e) for k, e in ends.values()), ends
    finally:
        scheduler.stop(1.0)
    alone = generate_with_stats(model, TOK, ["a"], 9, options=options["ancestral"])[0]
    assert ends[0][0] == "done" and ends[0][1].token_ids == alone.token_ids  # and the next request is served
    assert scheduler.active == 0


@pytest.mark.parametrize("attention", ["bidirectional", "causal"])
def test_a_row_whose_model_output_is_not_finite_fails_alone(attention):
    """A prompt whose characters make the model's output NaN (here one embedding row is NaN: a corrupted
    checkpoint, or an overflow) fails its own request, saying so; the rows decoded in the same model calls
    finish with exactly what they decode alone."""
    model = tiny(attention)
    with torch.no_grad():  # untie the output layer first: only this character's embedding is broken
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.clone())
        model.transformer.wte.weight[TOK.encode("z")[0]] = float("nan")
    options = server_options(DecodeOptions(temperature=0, seed=0).for_model(model), model)  # the default rule
    # greedy rows that never write a "z", and a sampled row with one in its prompt (its NaN probabilities
    # are sampled beside the greedy rows' in the same step)
    specs = [RowSpec("the cat", 12, options), RowSpec("xyz", 12, replace(options, temperature=0.9, top_k=20)),
             RowSpec("why not", 12, options)]
    with pytest.raises(FloatingPointError, match="not a finite number"):
        generate_with_stats(model, TOK, [specs[1].prompt], 12, options=specs[1].options)
    alone = [generate_with_stats(model, TOK, [specs[i].prompt], 12, options=specs[i].options)[0] for i in (0, 2)]
    got, scheduler = decode_together(model, specs, max_rows=3)
    assert isinstance(got[1], FloatingPointError) and "not a finite number" in str(got[1])
    assert [getattr(got[i], "token_ids", got[i]) for i in (0, 2)] == [a.token_ids for a in alone]
    assert scheduler.rows_per_call[3] > 0  # the failing row shared its calls with the others
    assert scheduler.active == 0


def test_partition_widths_pays_padding_only_where_it_is_cheaper_than_a_call():
    from inference.serving.scheduler import partition_widths

    widths = [64, 1, 60, 1, 2, 64]  # one row each

    def parts(overhead_tokens):
        return [[widths[i] for i in part] for part in partition_widths(widths, [1] * len(widths), overhead_tokens)]
    assert parts(overhead_tokens=16) == [[1, 1, 2], [60, 64, 64]]
    assert len(parts(overhead_tokens=1000)) == 1  # calls dear: always one call
    assert all(len(set(part)) == 1 for part in parts(overhead_tokens=0))  # calls free: never pad


# ----------------------------------------------------------------------------- the OpenAI API
def test_openai_client_lists_the_model_and_completes(mdlm_server):
    client = mdlm_server.client()
    models = client.models.list()
    assert [m.id for m in models.data] == ["mdlm"]
    out = client.completions.create(model="mdlm", prompt=["the cat", "a"], max_tokens=10, temperature=0, n=2,
                                    extra_body={"strategy": "topk", "tokens_per_step": 2})
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.choices[0].text == out.choices[1].text  # greedy: n samples agree
    assert all(c.finish_reason in ("length", "stop") and PLACEHOLDER not in c.text for c in out.choices)
    assert out.usage.prompt_tokens == len("the cat") + len("a")
    assert out.usage.completion_tokens == sum(len(c.text) for c in out.choices)  # one char = one token
    assert out.usage.model_extra["model_calls"] == 4 * 5  # each row: 10 tokens, 2 per call
    assert httpx.get(mdlm_server.url + "/health").json()["status"] == "ok"
    assert mdlm_server.metric("diffusiongpt_model_calls_total") > 0


def completed_alongside(client, model: str, target: dict, others: list[dict], at: int):
    """Send others[:at], then target, then the rest, all at once (target joins while others decode and
    others join after it); every request must succeed. Returns target's completion."""
    with ThreadPoolExecutor(len(others) + 1) as pool:
        requests = others[:at] + [target] + others[at:]
        futures = [pool.submit(client.completions.create, model=model, **r) for r in requests]
        results = [f.result() for f in futures]
    return results[at]


def test_same_output_alone_or_alongside_others_at_temperature_0(mdlm_server, model_dirs):
    client = mdlm_server.client()
    target = dict(prompt="hello world, how", max_tokens=24, temperature=0,
                  extra_body={"strategy": "threshold", "threshold": 0.2})
    alone = client.completions.create(model="mdlm", **target).choices[0].text
    hist_before = mdlm_server.batch_rows()
    others = [dict(prompt=p, max_tokens=n, temperature=t, seed=3,
                   extra_body={"strategy": s, "steps": n // 2} if s != "threshold" else {"strategy": s})
              for p, n, t, s in [("a", 40, 0.8, "topk"), ("the cat sat", 30, 0, "random"), ("xyz", 50, 1.0, "ancestral"),
                                 ("why", 20, 0, "blocks"), ("ok", 44, 0.5, "threshold"), ("q", 33, 0, "topk")]]
    others[3]["extra_body"]["kv_cache"] = True  # a bidirectional blocks row with its (opt-in) prefix cache
    assert completed_alongside(client, "mdlm", target, others, at=3).choices[0].text == alone
    # the requests shared model calls: several calls ran 5 or more of the 7 rows (~10 of ~75 calls on a 2-core CPU;
    # the mean rows per call is no measure of it, as it depends on how long the longest request decodes alone)
    hist = {bound: calls - hist_before[bound] for bound, calls in mdlm_server.batch_rows().items()}
    assert hist["+Inf"] - hist["4"] >= 3, f"requests did not share model calls (calls by rows, at most: {hist})"
    # and the server adds nothing to decoding: it is generate() on the same weights
    loaded = load_model(ckpt=str(model_dirs["mdlm"]), device="cpu", log=lambda m: None)
    model = loaded.model.double().eval()
    options = DecodeOptions(strategy="threshold", threshold=0.2, temperature=0, kv_cache=False)
    assert generate_with_stats(model, loaded.tokenizer, [target["prompt"]], 24, options=options)[0].text == alone


def test_seeded_sampling_is_reproducible(mdlm_server):
    client = mdlm_server.client()
    kw = dict(model="mdlm", prompt="the", max_tokens=16, temperature=1.0, seed=42)
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


def test_ar_rows_with_their_kv_cache_are_the_same_alone_or_alongside_others(ar_server, model_dirs):
    """AR rows decode with the KV cache; rows whose caches have different lengths (prompts of 1-20
    characters, rows joining mid-decode) share calls, and a greedy request's text does not change."""
    client = ar_server.client()
    target = dict(prompt="hello world, how", max_tokens=30, temperature=0)
    alone = client.completions.create(model="ar", **target).choices[0].text
    mixed_before = ar_server.metric("diffusiongpt_mixed_past_calls_total")
    cached_before = ar_server.metric("diffusiongpt_cached_row_calls_total")
    others = [dict(prompt=p, max_tokens=n, temperature=t, seed=5)
              for p, n, t in [("a", 40, 0.8), ("the cat sat", 25, 0), ("xyz", 44, 1.0), ("why", 12, 0), ("q", 33, 0.5)]]
    assert completed_alongside(client, "ar", target, others, at=2).choices[0].text == alone
    assert ar_server.metric("diffusiongpt_cached_row_calls_total") - cached_before > 100
    assert ar_server.metric("diffusiongpt_mixed_past_calls_total") > mixed_before, \
        "rows with KV caches of different lengths never shared a call"
    loaded = load_model(ckpt=str(model_dirs["ar"]), device="cpu", log=lambda m: None)
    model = loaded.model.double().eval()
    for kv_cache in (True, False):  # the cache changes nothing for an AR model
        options = DecodeOptions(strategy="ar", temperature=0, kv_cache=kv_cache)
        assert generate_with_stats(model, loaded.tokenizer, [target["prompt"]], 30, options=options)[0].text == alone


def test_stop_sequences_end_the_ar_decode_after_the_token(ar_server):
    client = ar_server.client()
    full = client.completions.create(model="ar", prompt="the cat", max_tokens=30, temperature=0)
    text = full.choices[0].text
    assert len(text) == 30 and full.choices[0].finish_reason == "length"
    at = next(i for i in range(5, 25) if text.index(text[i:i + 2]) == i)  # a pair first seen after 5 tokens
    stop = text[at:at + 2]
    cut = client.completions.create(model="ar", prompt="the cat", max_tokens=30, temperature=0, stop=stop)
    assert cut.choices[0].text == full.choices[0].text[:at] and cut.choices[0].finish_reason == "stop"
    # the decode ended with the token that completed the stop string: one call per token up to there
    assert cut.usage.model_extra["model_calls"] == at + len(stop) < full.usage.model_extra["model_calls"]
    assert cut.usage.completion_tokens == at + len(stop)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="ar", prompt="the cat", max_tokens=30, temperature=0, stop=stop, stream=True) if c.choices)
    assert streamed == cut.choices[0].text


def test_stop_sequences_end_block_decoding_at_a_block_boundary(mdlm_server):
    client = mdlm_server.client()
    kw = dict(model="mdlm", prompt="the cat", max_tokens=40, temperature=0,
              extra_body={"strategy": "blocks", "block_length": 8, "tokens_per_step": 2})
    full = client.completions.create(**kw)
    text = full.choices[0].text
    assert len(text) == 40 and full.usage.model_extra["model_calls"] == 20, text  # 5 blocks x 4 steps
    at = next(i for i in range(9, 25) if text.index(text[i:i + 2]) == i)  # a pair first seen after block 1
    stop = [text[at:at + 2], "never"]
    cut = client.completions.create(stop=stop, **kw)
    assert cut.choices[0].text == text[:at] and cut.choices[0].finish_reason == "stop"
    # the decode ended after the block that settled the stop string: 4 calls per block up to there
    # (the longest stop string, 5 characters, must fit in the committed text before it is final)
    blocks = -(-(at + len("never") - 1) // 8)  # bidirectional: the blocks start where the generation does
    assert cut.usage.model_extra["model_calls"] <= 4 * blocks < 20


# ----------------------------------------------------------------------------- streaming
def test_streamed_diffusion_canvas_fills_in_step_by_step(mdlm_server):
    client = mdlm_server.client()
    kw = dict(model="mdlm", prompt="the cat", max_tokens=12, temperature=0, extra_body={"strategy": "topk", "steps": 4})
    final = client.completions.create(**kw).choices[0].text
    canvases, text, usage = [], "", None
    for chunk in client.completions.create(stream=True, **kw):
        for choice in chunk.choices:
            text += choice.text
            canvases.append((choice.model_extra["canvas"], choice.finish_reason))
        usage = chunk.usage or usage
    masked = [c.count(PLACEHOLDER) for c, _ in canvases]
    assert masked[:4] == [9, 6, 3, 0], canvases  # 12 tokens over 4 steps: 3 committed per step
    assert canvases[-1][0] == final and canvases[-1][1] in ("length", "stop") and text == final
    assert usage.model_extra["model_calls"] == 4


def test_streamed_ar_tokens_concatenate_to_the_completion(ar_server):
    client = ar_server.client()
    kw = dict(model="ar", prompt="hello", max_tokens=20, temperature=0)
    final = client.completions.create(**kw).choices[0].text
    deltas = [c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices]
    assert "".join(deltas) == final and len([d for d in deltas if d]) > 5


# ----------------------------------------------------------------------------- bad requests
CONTEXT = 64
BAD_REQUESTS = {
    "not_json": (b'{"prompt": "a",', 400, "not valid JSON"),
    "not_utf8": (b'{"prompt": "\xff\xfe"}', 400, "not UTF-8"),
    "not_an_object": (b'["a"]', 400, "must be a JSON object"),
    "unknown_field": ({"prompt": "a", "temprature": 0}, 400, "unknown field(s) 'temprature'"),
    "no_prompt": ({"max_tokens": 4}, 400, "prompt is required"),
    "prompt_too_long": ({"prompt": "a" * 70, "max_tokens": 4}, 400, "longer than the model's context"),
    "max_tokens_zero": ({"prompt": "a", "max_tokens": 0}, 400, "max_tokens must be >= 1"),
    "max_tokens_past_context": ({"prompt": "abc", "max_tokens": 100}, 400, "lower max_tokens to 61"),
    "strategy_for_another_model": ({"prompt": "a", "strategy": "ar"}, 400, "use one of ancestral"),
    "unknown_strategy": ({"prompt": "a", "strategy": "beam"}, 400, "unknown strategy 'beam'"),
    "n_too_large": ({"prompt": "a", "n": 1000}, 400, "lower n or split the request"),
    "negative_temperature": ({"prompt": "a", "temperature": -1}, 400, "temperature must be >= 0"),
    "threshold_out_of_range": ({"prompt": "a", "strategy": "threshold", "threshold": 2}, 400, "threshold must be in"),
    "char_not_in_vocabulary": ({"prompt": "ROMEO"}, 400, "not in the char vocabulary"),
    "unsupported_logprobs": ({"prompt": "a", "logprobs": 3}, 400, "logprobs is not supported"),
    "unknown_model": ({"prompt": "a", "model": "gpt-4"}, 404, "this server serves 'mdlm'"),
    # numbers: finite (Python's JSON and curl send NaN / Infinity), OpenAI's ranges, integers a tensor holds
    "temperature_nan": ({"prompt": "a", "temperature": float("nan")}, 400, "temperature must be a finite number"),
    "temperature_infinite": ({"prompt": "a", "temperature": float("inf")}, 400, "temperature must be a finite number"),
    "temperature_above_2": ({"prompt": "a", "temperature": 2.5}, 400, "temperature must be >= 0 and <= 2"),
    "top_p_nan": ({"prompt": "a", "top_p": float("nan")}, 400, "top_p must be a finite number in (0, 1]"),
    "threshold_nan": ({"prompt": "a", "strategy": "threshold", "threshold": float("nan")}, 400,
                      "threshold must be a finite number in [0, 1]"),
    "integer_as_a_string": ({"prompt": "a", "max_tokens": "3"}, 400, "max_tokens must be >= 1, an integer"),
    "seed_past_64_bits": ({"prompt": "a", "seed": 2 ** 70}, 400, "seed must be a 64-bit signed integer"),
    "steps_past_bound": ({"prompt": "a", "steps": 10 ** 30}, 400, "steps must be between 1 and 65536"),
    "top_k_past_64_bits": ({"prompt": "a", "top_k": 2 ** 64}, 400, "top_k must be between 1 and"),
}


@pytest.mark.parametrize("name", sorted(BAD_REQUESTS))
def test_bad_request_gets_an_openai_error_and_the_server_still_serves(mdlm_server, name):
    body, status, message = BAD_REQUESTS[name]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(mdlm_server.url + "/v1/completions", content=content,
                   headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["type"], error
    ok = httpx.post(mdlm_server.url + "/v1/completions", json={"prompt": "a", "max_tokens": 3}, timeout=30)
    assert ok.status_code == 200 and len(ok.json()["choices"][0]["text"]) <= 3


def test_a_body_sent_as_a_form_is_refused_saying_to_send_json(mdlm_server):
    """curl -d sends Content-Type application/x-www-form-urlencoded: the answer says which header to send.
    A body without a Content-Type is read as JSON."""
    body = json.dumps({"prompt": "a", "max_tokens": 3}).encode()
    r = httpx.post(mdlm_server.url + "/v1/completions", content=body, timeout=30,
                   headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400 and "Content-Type: application/json" in r.json()["error"]["message"], r.text
    assert httpx.post(mdlm_server.url + "/v1/completions", content=body, timeout=30).status_code == 200


def test_openapi_schema_describes_the_completion_body(mdlm_server):
    """GET /openapi.json: the body of POST /v1/completions is the model the server validates with (unknown
    fields refused, OpenAI's ranges, the strategies), so generated clients and fuzzers see the real API."""
    spec = httpx.get(mdlm_server.url + "/openapi.json", timeout=30).json()
    ref = spec["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    body = spec["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert body["additionalProperties"] is False and body["required"] == ["prompt"]
    fields = body["properties"]
    temperature = next(t for t in fields["temperature"]["anyOf"] if t.get("type") == "number")
    assert (temperature["minimum"], temperature["maximum"]) == (0, 2)
    strategies = next(t for t in fields["strategy"]["anyOf"] if "enum" in t)["enum"]
    assert strategies == ["ancestral", "topk", "random", "threshold", "blocks", "ar"]
    assert {"prompt", "max_tokens", "seed", "stream", "steps", "block_length", "kv_cache"} <= set(fields)


def test_metrics_are_prometheus_text_with_the_process_metrics(mdlm_server):
    from prometheus_client.parser import text_string_to_metric_families
    mdlm_server.client().completions.create(model="mdlm", prompt="a", max_tokens=3)
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(mdlm_server.url + "/metrics").text)}
    kinds = {name: families[name].type for name in ("diffusiongpt_requests", "diffusiongpt_model_calls",
                                                     "diffusiongpt_batch_rows", "diffusiongpt_active_rows",
                                                     "diffusiongpt_request_latency_seconds", "process_cpu_seconds")}
    assert kinds == {"diffusiongpt_requests": "counter", "diffusiongpt_model_calls": "counter",
                     "diffusiongpt_batch_rows": "histogram", "diffusiongpt_active_rows": "gauge",
                     "diffusiongpt_request_latency_seconds": "histogram", "process_cpu_seconds": "counter"}
    assert any(s.labels == {"code": "200"} and s.value >= 1 for s in families["diffusiongpt_requests"].samples)


def test_openai_client_raises_on_a_bad_request(mdlm_server):
    with pytest.raises(openai.BadRequestError, match="lower max_tokens"):
        mdlm_server.client().completions.create(model="mdlm", prompt="abc", max_tokens=100)
    assert httpx.get(mdlm_server.url + "/nowhere").json()["error"]["code"] == "not_found"


FIELDS = ["model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "stream_options",
          "strategy", "steps", "tokens_per_step", "threshold", "block_length", "block_rule", "top_k", "kv_cache",
          "logprobs", "echo", "best_of", "temprature"]
EDGES = st.sampled_from([float("nan"), float("inf"), -float("inf"), 2 ** 63, 2 ** 64, -2 ** 63 - 1, 10 ** 30, 1e300,
                         -1, 0, 0.0, -0.0, 2.0000001, 1e-300, True, None, "", "1", [], {}, [1, "a"], "\u00e9\x00"])
DECODABLE = st.fixed_dictionaries(  # bodies that decode (a few tokens: fast), each field of a valid type
    {"prompt": st.text(alphabet="abc xyz", max_size=10), "max_tokens": st.integers(1, 12)},
    optional={"temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "seed": st.integers(-2 ** 63, 2 ** 63 - 1),
              "n": st.integers(1, 3), "stop": st.sampled_from(["a", ["b", " "]]), "stream": st.booleans(),
              "strategy": st.sampled_from(["ancestral", "topk", "random", "threshold", "blocks"]),
              "steps": st.integers(1, 20), "threshold": st.floats(0, 1), "block_length": st.integers(1, 16),
              "block_rule": st.sampled_from(["topk", "random", "threshold"]), "top_k": st.integers(1, 40)})
NUMERIC_FIELDS = ["max_tokens", "temperature", "top_p", "n", "seed", "steps", "tokens_per_step", "threshold",
                  "block_length", "top_k"]
FUZZED_BODY = st.one_of(
    st.builds(lambda body, edits: json.dumps({**body, **edits}).encode(),  # decodable but for a number or two
              DECODABLE, st.dictionaries(st.sampled_from(NUMERIC_FIELDS), EDGES, min_size=1, max_size=2)),
    st.builds(lambda body, edits: json.dumps({**body, **edits}).encode(),  # ... or any field or two
              DECODABLE, st.dictionaries(st.sampled_from(FIELDS), EDGES, max_size=2)),
    st.dictionaries(st.sampled_from(FIELDS), EDGES, max_size=5).map(lambda d: json.dumps(d).encode()),
    st.binary(max_size=24),  # not JSON, not UTF-8
    EDGES.map(lambda v: json.dumps(v).encode()))  # not an object
GOOD_REQUESTS = [dict(prompt="the cat", max_tokens=12, temperature=0, extra_body={"strategy": "topk", "steps": 6}),
                 dict(prompt="hello", max_tokens=10, temperature=0.9, seed=11),  # ancestral, sampled
                 dict(prompt="xyz", max_tokens=16, temperature=0.7, seed=5,
                      extra_body={"strategy": "blocks", "block_length": 8, "block_rule": "random"})]


def test_fuzzed_bodies_get_4xx_and_never_disturb_the_requests_decoding_beside_them(mdlm_server):
    """Random and malformed bodies (hypothesis: a fixed, bounded set of examples) sent at once with good
    requests: each fuzzed body is answered 200 or 4xx with an OpenAI error, never 5xx, and each good request
    is answered exactly as when it was sent alone."""
    client = mdlm_server.client()
    alone = [client.completions.create(model="mdlm", **r).choices[0].text for r in GOOD_REQUESTS]
    sent = [0]

    @hypothesis.settings(max_examples=30, deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(st.lists(FUZZED_BODY, min_size=1, max_size=4))
    @hypothesis.example([json.dumps({"prompt": "a", "max_tokens": 8, "temperature": v}).encode()
                         for v in (float("nan"), float("inf"))] + [b'{"prompt": "a", "seed": 1180591620717411303424}'])
    def fuzzed_beside_a_good_request(bodies):
        k = sent[0] % len(GOOD_REQUESTS)
        sent[0] += 1
        with ThreadPoolExecutor(len(bodies) + 1) as pool:
            good = pool.submit(client.completions.create, model="mdlm", **GOOD_REQUESTS[k])
            answers = list(pool.map(lambda b: httpx.post(mdlm_server.url + "/v1/completions", content=b, timeout=30,
                                                         headers={"Content-Type": "application/json"}), bodies))
            assert good.result().choices[0].text == alone[k]
        for body, r in zip(bodies, answers):
            assert r.status_code < 500, (body, r.status_code, r.text)
            if r.status_code >= 400:
                assert r.json()["error"]["message"], (body, r.text)
    fuzzed_beside_a_good_request()
    assert sent[0] >= 30


# ----------------------------------------------------------------------------- load and lifecycle
def test_api_key_is_checked_on_every_request(small_server):
    with pytest.raises(openai.AuthenticationError, match="Authorization: Bearer"):
        small_server.client(key="wrong").models.list()
    assert httpx.get(small_server.url + "/metrics").status_code == 401
    assert httpx.get(small_server.url + "/health").status_code == 200  # liveness stays open
    assert small_server.client(key=KEY).models.list().data[0].id == "mdlm"


def test_the_cost_of_a_call_is_measured_at_startup_unless_given(mdlm_server, small_server):
    """The scheduler's padding-vs-separate-call trade (partition_widths) uses what a call costs on the
    device it runs on: measured when the server starts, or --call_overhead_tokens."""
    measured = mdlm_server.metric("diffusiongpt_call_overhead_tokens")  # a timing: its value is tested above
    logged = re.search(r"costs about (\d+) row-columns of work on cpu \(measured\)", mdlm_server.output())
    assert logged and abs(measured - int(logged.group(1))) <= 0.5  # the scheduler uses what was measured
    given = small_server.metric("diffusiongpt_call_overhead_tokens", headers={"Authorization": f"Bearer {KEY}"})
    assert given == 1000.0 and "(given)" in small_server.output()


@pytest.mark.parametrize("value", ["-1", "nan"])
def test_a_negative_call_overhead_is_refused_saying_what_to_give(value, capsys):
    from inference.serving.app import parse_args
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--ckpt", "out/x", "--call_overhead_tokens", value])
    assert exit_.value.code == 2
    assert "--call_overhead_tokens must be >= 0 (0 = measure it)" in capsys.readouterr().err


@pytest.mark.parametrize("setting, said", [
    (["--port", "99999"], "--port must be 0-65535 (a free one, e.g. 8000), got 99999"),
    (["--max_rows", "0"], "--max_rows must be >= 1, got 0"),
    (["--max_n", "-2"], "--max_n must be >= 1, got -2"),
    (["--max_queue", "-1"], "--max_queue must be >= 0, got -1"),
    (["--grace_s", "nan"], "--grace_s must be >= 0 (0 = stop at once), got nan"),
    (["--step_delay_s", "-0.5"], "--step_delay_s must be >= 0 (0 = no pause), got -0.5"),
    (["--ckpt", "out/y", "--init_from", "gpt2"], "exactly one")])
def test_a_bad_setting_is_refused_before_anything_loads(setting, said, capsys):
    from inference.serving.app import parse_args
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--ckpt", "out/x", *setting] if "--ckpt" not in setting else setting)
    assert exit_.value.code == 2 and said in capsys.readouterr().err


@pytest.mark.parametrize("setting", [["--concurrency", "0"], ["--concurrency", "1,-4"], ["--requests", "0"],
                                     ["--rounds", "0"]])
def test_the_load_benchmark_refuses_a_load_of_nothing_before_starting_a_server(setting):
    from bench.serve_load import main
    with pytest.raises(SystemExit) as exit_:
        main(["--ckpt", "no/such/checkpoint", *setting])
    assert "must be >= 1" in str(exit_.value.code)


def test_a_port_another_server_holds_is_refused_before_the_model_loads(capsys):
    """The server binds as uvicorn does; the checkpoint does not exist, so only the port check can answer."""
    from inference.serving.app import main
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert main(["--ckpt", "no/such/checkpoint", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port} (Address already in use)" in err and "choose another --port" in err


@pytest.mark.parametrize("fixed_s, per_column_s, want", [(4e-4, 2e-5, 21.0),  # (0.4 + 0.02) / 0.02
                                                           (1e-3, 0.0, 1e6)])  # size costs nothing: capped
def test_measure_call_overhead_is_a_call_over_the_cost_of_a_row_column(fixed_s, per_column_s, want):
    """The real model runs; only the clock is simulated, so that every call of R rows x W columns takes
    fixed_s + per_column_s x R x W: the overhead is then (fixed_s + per_column_s) / per_column_s exactly."""
    from inference.serving.scheduler import measure_call_overhead
    model = tiny("bidirectional")
    now = [0.0]
    hidden_states = model.hidden_states

    def timed(idx, **kw):
        now[0] += fixed_s + per_column_s * idx.numel()
        return hidden_states(idx, **kw)
    model.hidden_states = timed
    assert measure_call_overhead(model, rows=4, width=32, repeats=3, clock=lambda: now[0]) == pytest.approx(want)


def test_a_full_queue_answers_429(small_server):
    client = small_server.client(key=KEY)
    with pytest.raises(openai.RateLimitError, match="at capacity"):  # 2 running + 2 queued < 5 rows
        client.completions.create(model="mdlm", prompt="a", max_tokens=4, n=5)
    with ThreadPoolExecutor(8) as pool:  # 8 requests of 1 row at once: 4 fit, the rest are refused
        futures = [pool.submit(client.with_options(max_retries=0).completions.create, model="mdlm", prompt="a",
                               max_tokens=8, extra_body={"strategy": "topk", "steps": 8}) for _ in range(8)]
        outcomes = []
        for f in futures:
            try:
                outcomes.append(len(f.result().choices))
            except openai.RateLimitError:
                outcomes.append(429)
    assert outcomes.count(429) >= 1 and outcomes.count(1) >= 2, outcomes
    assert client.completions.create(model="mdlm", prompt="a", max_tokens=2).choices[0].text is not None


def test_a_client_that_leaves_frees_its_rows(small_server):
    headers = {"Authorization": f"Bearer {KEY}"}
    # 60 steps of >= 50 ms: 3 s if nobody left
    body = {"prompt": "a", "max_tokens": 60, "stream": True, "strategy": "topk", "tokens_per_step": 1}
    rows_before = small_server.metric("diffusiongpt_row_calls_total", headers)
    t0 = time.monotonic()
    with httpx.stream("POST", small_server.url + "/v1/completions", json=body, headers=headers, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # one step seen: hang up
    try:  # a non-streamed request whose client times out is cancelled too
        httpx.post(small_server.url + "/v1/completions", json={**body, "stream": False}, headers=headers, timeout=0.3)
    except httpx.TimeoutException:
        pass
    while small_server.metric("diffusiongpt_active_rows", headers) and time.monotonic() - t0 < 10:
        time.sleep(0.1)
    assert small_server.metric("diffusiongpt_active_rows", headers) == 0
    # both requests running to the end would take 120 row calls; one of them alone, 60
    assert small_server.metric("diffusiongpt_row_calls_total", headers) - rows_before < 60, "the rows ran to the end"
    ok = small_server.client(key=KEY).completions.create(model="mdlm", prompt="b", max_tokens=3)
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_sigterm_finishes_in_flight_requests_and_exits_0(model_dirs):
    server = Server(model_dirs["mdlm"], "--step_delay_s", "0.02", "--grace_s", "10")
    try:
        client = server.client()
        with ThreadPoolExecutor(2) as pool:
            future = pool.submit(client.completions.create, model="mdlm", prompt="a", max_tokens=40,
                                 extra_body={"strategy": "topk", "tokens_per_step": 1})  # ~1 s
            deadline = time.monotonic() + 30
            while server.metric("diffusiongpt_active_rows") == 0:
                assert not future.done(), future.result()  # ended before it was seen running: says how
                assert time.monotonic() < deadline, "the request never started decoding"
                time.sleep(0.02)
            server.proc.send_signal(signal.SIGTERM)
            out = future.result(timeout=30)
        assert out.choices[0].finish_reason in ("length", "stop") and out.usage.model_extra["model_calls"] == 40
        assert server.proc.wait(timeout=20) == 0, server.output()
        with pytest.raises(httpx.ConnectError):
            httpx.get(server.url + "/health", timeout=2)
    finally:
        server.stop()


def test_sigterm_past_the_grace_period_answers_each_request_with_an_error_it_can_read(model_dirs):
    """Requests still decoding when --grace_s runs out are cancelled and answered, not cut: a streamed one
    ends its choice with finish_reason "cancelled" and then an error event (the official client raises an
    APIError naming the shutdown), a non-streamed one gets a 503 saying so. No traceback, exit 0."""
    server = Server(model_dirs["mdlm"], "--step_delay_s", "0.05", "--grace_s", "1")
    try:
        client = server.client()
        kw = dict(model="mdlm", prompt="a", max_tokens=60, extra_body={"strategy": "topk", "tokens_per_step": 1})

        def streamed():  # 60 steps of >= 50 ms: 3 s if nobody stopped it
            chunks = []
            try:
                for chunk in client.completions.create(stream=True, **kw):
                    chunks.append(chunk)
            except openai.APIError as e:
                return chunks, e
            return chunks, None
        with ThreadPoolExecutor(4) as pool:
            streams = [pool.submit(streamed) for _ in range(2)]
            plain = [pool.submit(client.completions.create, **kw) for _ in range(2)]
            deadline = time.monotonic() + 30
            while server.metric("diffusiongpt_active_rows") < 4:
                assert not any(f.done() for f in streams + plain), "a request ended before all four were decoding"
                assert time.monotonic() < deadline, "the requests never started decoding"
                time.sleep(0.02)
            server.proc.send_signal(signal.SIGTERM)
            for f in streams:
                chunks, error = f.result(timeout=30)
                assert isinstance(error, openai.APIError) and "shutting down" in str(error), error
                assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "cancelled"
            for f in plain:
                with pytest.raises(openai.InternalServerError, match="shutting down"):  # 503
                    f.result(timeout=30)
        assert server.proc.wait(timeout=30) == 0, server.output()
        assert "Traceback" not in server.output(), server.output()
    finally:
        server.stop()


# ----------------------------------------------------------------------------- the playground, in a browser
def find_chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class DevTools:
    """Chrome DevTools Protocol over --remote-debugging-pipe (fd 3: commands in, fd 4: replies out)."""

    def __init__(self, binary, url, profile):
        cmd_r, self.cmd_w = os.pipe()
        self.out_r, out_w = os.pipe()
        # the child's ends above fd 10 first, so that moving them to 3 and 4 cannot overwrite each other
        high_r, high_w = fcntl.fcntl(cmd_r, fcntl.F_DUPFD, 10), fcntl.fcntl(out_w, fcntl.F_DUPFD, 10)
        os.close(cmd_r)
        os.close(out_w)
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}", "--remote-debugging-pipe"]

        def fds():  # in the child: fd 3 and 4 become the pipe ends (kept open through exec by pass_fds)
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)
        self.proc = subprocess.Popen([binary, *flags, url], preexec_fn=fds, pass_fds=(3, 4),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(high_r)
        os.close(high_w)
        self.buffer, self.next_id = b"", 0

    def send(self, method, params=None, session=None, timeout=20):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self.buffer:
                raw, self.buffer = self.buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self.next_id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply["result"]
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.out_r], [], [], left)[0]:
                raise TimeoutError(f"no reply to {method}")
            chunk = os.read(self.out_r, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed the pipe")
            self.buffer += chunk

    def close(self):
        try:
            self.send("Browser.close", timeout=5)
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self.cmd_w)
        os.close(self.out_r)


def test_playground_page_streams_a_completion_in_headless_chromium(mdlm_server, tmp_path):
    binary = find_chromium()
    if binary is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium; .ci/run installs it as root)")
    want = mdlm_server.client().completions.create(model="mdlm", prompt="the cat", max_tokens=20, temperature=0,
                                                   extra_body={"strategy": "topk", "steps": 5}).choices[0].text
    browser = DevTools(binary, mdlm_server.url + "/", tmp_path / "profile")
    try:
        page = next(t for t in browser.send("Target.getTargets")["targetInfos"] if t["type"] == "page")
        session = browser.send("Target.attachToTarget", {"targetId": page["targetId"], "flatten": True})["sessionId"]

        def js(expression):
            result = browser.send("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session)
            return result["result"].get("value")

        deadline = time.monotonic() + 30
        while js("document.getElementById('strategy') && document.getElementById('strategy').options.length") != 5:
            assert time.monotonic() < deadline, "the page never listed the model's strategies"
            time.sleep(0.1)
        js("""document.getElementById('prompt').value = 'the cat';
              document.getElementById('max_tokens').value = '20';
              document.getElementById('temperature').value = '0';
              document.getElementById('steps').value = '5';
              document.getElementById('strategy').value = 'topk';
              document.getElementById('go').click();""")
        while not (js("document.getElementById('status').textContent") or "").startswith(("done", "error")):
            assert time.monotonic() < deadline, "the page never finished"
            time.sleep(0.1)
        assert js("document.getElementById('status').textContent").startswith("done"), \
            js("document.getElementById('status').textContent")
        assert js("document.getElementById('canvas').dataset.text") == want
        assert js("document.getElementById('canvas').textContent") == "the cat" + want
    finally:
        browser.close()
