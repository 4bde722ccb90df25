"""Load benchmark of the server: the official `openai` client at several concurrencies, loopback only.

    python -m bench.serve_load --ckpt out/shakespeare_mdlm                       # 1, 4, 16, 64 concurrent
    python -m bench.serve_load --ckpt out/shakespeare_mdlm --requests 64 --concurrency 1 16 --max_seconds 60
    python -m bench.serve_load --ckpt out/shakespeare_mdlm --concurrency 1 16 --rounds 3    # medians of 3 rounds
    python -m bench.serve_load --url http://127.0.0.1:8000 --model shakespeare_mdlm   # a server already running

Starts `python -m inference.serve` on a free 127.0.0.1 port (unless --url), then sends the SAME list of
requests (mixed prompt lengths and max_tokens, seeded) at each concurrency: a pool of N client threads,
each sending its next request when the previous one is answered. Bounded in count (--requests) and in
time (--max_seconds per level: no new request starts after it). Per level: generated tokens/s, p50 / p99
latency, merged model calls per generated token and rows per call (from the server's /metrics), errors,
and the server's resident memory before and after. Concurrency 1 is "the same requests one at a time",
the baseline of the speedup column. On a shared, noisy machine --rounds N runs all levels N times in
turn and reports, per level, the round with the median tokens/s.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx

from common.config import knob, parse_cli
from common.ports import free_port

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["ROMEO:", "JULIET:\nO Romeo, Romeo!", "First Citizen:\nBefore we proceed any further, hear me speak.",
           "KING", "\n", "HAMLET:\nTo be, or not", "MENENIUS:\nWhy, masters, my good friends",
           "Now is the winter of our discontent", "LADY MACBETH:\nOut, damned spot!", "Thou"]


def make_requests(n: int, context: int, seed: int) -> list[dict]:
    """n requests with mixed prompts and lengths (fixed by the seed), each fitting the context."""
    rng = random.Random(seed)
    fitting = [p for p in PROMPTS if len(p) < context]  # characters >= tokens (char and GPT-2 BPE alike)
    out = []
    for i in range(n):
        prompt = rng.choice(fitting)
        room = context - len(prompt) - 1
        out.append({"prompt": prompt, "max_tokens": max(1, min(room, rng.choice([8, 16, 24, 32, 48]))),
                    "seed": seed + i})
    return out


def start_server(args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "inference.serve", "--host", "127.0.0.1", "--port", str(port),
           "--max_rows", str(args.max_rows), "--max_queue", str(args.max_queue), "--threads", str(args.threads)]
    cmd += ["--ckpt", args.ckpt] if args.ckpt else ["--init_from", args.init_from]
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{log.read().decode(errors='replace')}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not start within 120 s")


def read_metrics(url: str, headers: dict) -> dict:
    out = {}
    for line in httpx.get(url + "/metrics", headers=headers, timeout=30).text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.split()
            out[name] = float(value)
    return out


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * len(values) + 0.5) - 1))]


def run_level(client, model: str, requests: list[dict], concurrency: int, max_seconds: float, extra: dict,
              url: str, headers: dict) -> dict:
    before = read_metrics(url, headers)
    deadline = time.perf_counter() + max_seconds
    latencies, tokens, errors = [], [], []

    def one(req):
        if time.perf_counter() > deadline:
            return None  # the level's time is up: not started
        t0 = time.perf_counter()
        try:
            out = client.completions.create(model=model, temperature=0.8, extra_body=extra or None, **req)
        except Exception as e:  # noqa: BLE001 - every failure is counted, the run goes on
            errors.append(f"{type(e).__name__}: {e}"[:200])
            return None
        latencies.append(time.perf_counter() - t0)
        tokens.append(out.usage.completion_tokens)
        return out

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, requests))
    wall = time.perf_counter() - t0
    after = read_metrics(url, headers)
    calls = after["diffusiongpt_model_calls_total"] - before["diffusiongpt_model_calls_total"]
    rows = after["diffusiongpt_row_calls_total"] - before["diffusiongpt_row_calls_total"]
    model_s = after["diffusiongpt_model_seconds_total"] - before["diffusiongpt_model_seconds_total"]
    n_tok = sum(tokens)
    return {"concurrency": concurrency, "requests": len(latencies), "errors": len(errors), "error_samples": errors[:3],
            "tokens": n_tok, "wall_s": wall, "tokens_per_s": n_tok / wall,
            "p50_s": percentile(latencies, 50), "p99_s": percentile(latencies, 99),
            "calls_per_token": calls / max(n_tok, 1), "rows_per_call": rows / max(calls, 1),
            "model_share": model_s / wall, "model_bound_tokens_per_s": n_tok / max(model_s, 1e-9),
            "rss_before_mb": before["process_resident_memory_bytes"] / 2**20,
            "rss_after_mb": after["process_resident_memory_bytes"] / 2**20}


def median_run(runs: list[dict]) -> dict:
    """The run with the median tokens/s of a level's rounds (the lower middle one of an even count),
    with every round's tokens/s and all rounds' errors beside it."""
    middle = dict(sorted(runs, key=lambda r: r["tokens_per_s"])[(len(runs) - 1) // 2])
    middle["rounds_tokens_per_s"] = [r["tokens_per_s"] for r in runs]
    middle["errors"] = sum(r["errors"] for r in runs)
    return middle


def markdown_table(levels: list[dict]) -> list[str]:
    """The load table (Markdown lines) of `run_level` results; the speedup columns are against concurrency 1.

    "time in model calls" is the share of the level's wall time the server spent in model calls, and
    "model-bound" the tokens/s of a server that spent no time on anything else: the model calls of that
    level alone. Where the model-bound speedup is small, the calls themselves do not get cheaper per
    token when merged (compute-bound: a small CPU), and no scheduler can do much better."""
    base = levels[0]["tokens_per_s"] if levels and levels[0]["concurrency"] == 1 else None
    lines = ["| concurrency | requests | tokens/s | vs 1 at a time | p50 latency (s) | p99 latency (s) "
             "| model calls / token | rows / call | time in model calls | model-bound vs 1 at a time | errors "
             "| server RSS (MB) before -> after |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in levels:
        speed = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        bound = f"{r['model_bound_tokens_per_s'] / base:.2f}x" if base else "-"
        lines.append(f"| {r['concurrency']} | {r['requests']} | {r['tokens_per_s']:.0f} | {speed} | {r['p50_s']:.2f} | "
                     f"{r['p99_s']:.2f} | {r['calls_per_token']:.3f} | {r['rows_per_call']:.1f} | "
                     f"{100 * r['model_share']:.0f}% | {bound} | {r['errors']} | "
                     f"{r['rss_before_mb']:.0f} -> {r['rss_after_mb']:.0f} |")
    return lines


@dataclass
class LoadConfig:
    """`python -m bench.serve_load` (common/config.py: --key=value, --key value, --config FILE)."""
    ckpt: str = knob("", "start a server on this checkpoint (loopback, a free port)")
    init_from: str = knob("", "start a server on GPT-2 (gpt2 | ... | a Hugging Face dir)")
    url: str = knob("", "or use a running server (loopback only); --model names its model")
    model: str = knob("", "model id to request ('' = the server's)")
    api_key: str = knob("none", "the server's API key")
    concurrency: list[int] = knob([1, 4, 16, 64], "client concurrency levels, one after another")
    requests: int = knob(200, "requests per concurrency level")
    warmup: int = knob(32, "requests sent first, at the highest concurrency, not timed (kernel compilation on a GPU)")
    rounds: int = knob(1, "run the levels this many times in turn; each row is the round with the median tokens/s "
                          "(a noisy machine)")
    max_seconds: float = knob(120.0, "no new request starts after this, per level")
    strategy: str = knob("", "decoding strategy ('' = the model's default)")
    max_rows: int = knob(64, "the server's rows per model call")
    max_queue: int = knob(256, "the server's queue")
    threads: int = knob(1, "the server's torch CPU threads")
    seed: int = knob(0, "seed of the request mix")
    out: str = knob("", "also write the results as JSON")


def main(argv=None) -> int:
    args = parse_cli(LoadConfig, argv, prog="python -m bench.serve_load", description=__doc__)
    if args.rounds < 1 or args.warmup < 0:
        sys.exit("python -m bench.serve_load: error: --rounds must be >= 1 and --warmup >= 0")
    if not args.concurrency or min(args.concurrency) < 1 or args.requests < 1:
        sys.exit(f"python -m bench.serve_load: error: --concurrency levels and --requests must be >= 1 (got "
                 f"--concurrency {','.join(map(str, args.concurrency)) or 'none'}, --requests {args.requests})")
    if sum(map(bool, (args.ckpt, args.init_from, args.url))) != 1:
        sys.exit("python -m bench.serve_load: error: give exactly one of --ckpt, --init_from, --url")
    if args.url and not args.url.startswith(("http://127.0.0.1", "http://localhost", "http://[::1]")):
        sys.exit("python -m bench.serve_load: error: --url must be a loopback address (this benchmark never "
                 "leaves the machine)")

    import openai
    proc = None
    try:
        if args.url:
            url = args.url.rstrip("/")
        else:
            proc, url = start_server(args)
        headers = {"Authorization": f"Bearer {args.api_key}"}
        card = httpx.get(url + "/v1/models", headers=headers, timeout=30).json()["data"][0]
        model = args.model or card["id"]
        client = openai.OpenAI(base_url=url + "/v1", api_key=args.api_key, max_retries=0, timeout=600)
        requests = make_requests(args.requests, card["context_length"], args.seed)
        extra = {"strategy": args.strategy} if args.strategy else {}
        client.completions.create(model=model, prompt="a", max_tokens=4, extra_body=extra or None)  # warm up
        if args.warmup:  # untimed: on a GPU the first calls of each shape compile and autotune kernels, and
            # that must not land in the first level measured (the one-at-a-time baseline)
            run_level(client, model, requests[:args.warmup], max(args.concurrency), args.max_seconds, extra, url, headers)
        runs = {c: [] for c in args.concurrency}
        for round_ in range(args.rounds):  # the levels in turn, round after round: drift hits them alike
            for c in args.concurrency:
                r = run_level(client, model, requests, c, args.max_seconds, extra, url, headers)
                runs[c].append(r)
                print(f"round {round_ + 1}, concurrency {c}: {r['requests']} requests, {r['tokens_per_s']:.0f} "
                      f"tokens/s, p50 {r['p50_s']:.2f} s, p99 {r['p99_s']:.2f} s, errors {r['errors']}",
                      file=sys.stderr, flush=True)
        results = [median_run(runs[c]) for c in args.concurrency]
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(f"\nmodel {model} ({card['objective']}, strategy {args.strategy or card['default_strategy']}), "
          f"{args.requests} requests per level (max_tokens 8-48, temperature 0.8), server threads {args.threads}"
          + (f", the median of {args.rounds} rounds" if args.rounds > 1 else ""))
    print("\n".join(markdown_table(results)))
    if args.out:
        Path(args.out).write_text(json.dumps({"model": model, "objective": card["objective"],
                                              "strategy": args.strategy or card["default_strategy"],
                                              "requests": args.requests, "rounds": args.rounds,
                                              "levels": results}, indent=2))
    return 1 if any(r["errors"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
