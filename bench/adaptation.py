"""AR -> diffusion: is adapting an AR model (--init_from, with or without --model.shift and attention
annealing) better than training the diffusion model from scratch? The table and plot of docs/training.md.

    python -m bench.adaptation                                    # mdlm and bd3lm, seeds 0 1 2 (CPU: ~1.5 h)
    python -m bench.adaptation --objectives mdlm --seeds 0,1,2    # grids add up in --work_dir
    python -m bench.adaptation --report_only                      # table + plot from the finished runs

Every run is the real `python training/pretrain.py` (one process, DeepSpeed ZeRO-2) on the quickstart model
and data (--config_dir), at batch 64 (the quickstart's global batch). Per seed and objective, with S = --steps:

    scratch        the diffusion model from scratch, S steps        (equal TOTAL steps)
    scratch_half   from scratch, S/2 steps                          (equal ADAPTATION steps)
    ar_half        the AR model, S/2 steps: the starting point of
    adapt          --init_from ar_half, S/2 steps, no shift
    adapt_shift    the same with --model.shift
    adapt_anneal   shift + --anneal_attention_iters S/4 (mdlm only, unless --anneal_all)

A run whose export exists is not run again. Each export is then scored on the same --eval_batches val
batches: the model's own val NELBO (continuous bound, fixed seeds; a shifted model keeps token 0 clean), the
NELBO of tokens 1.. given token 0 for every model (the equal-terms comparison: the shift never scores token 0),
and the generative perplexity of --samples samples (prompt "\\n", the sample CLI's defaults) under the AR
judge (an AR model trained S steps, seed 0). Means +- standard error over seeds.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: find the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import knob, parse_cli
from training.cpu_comm_op import OP_CACHE

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("scratch", "scratch_half", "adapt", "adapt_shift", "adapt_anneal")


@dataclass
class AdaptationConfig:
    objectives: list[str] = knob(["mdlm", "bd3lm"], "diffusion objectives to measure")
    seeds: list[int] = knob([0, 1, 2], "training seeds")
    steps: int = knob(1000, "S: total steps of the scratch run (the AR start and each adaptation get S/2)")
    batch_size: int = knob(64, "batch of the one training process")
    config_dir: str = knob("training/configs", "where shakespeare_{ar,mdlm,bd3lm}.json are")
    work_dir: str = knob("out/adaptation", "runs go to WORK_DIR/<run>_s<seed>; the results to WORK_DIR/results.json")
    eval_batches: int = knob(40, "val batches (x batch_size windows) for every score")
    samples: int = knob(32, "samples per model for the generative perplexity")
    anneal_all: bool = knob(False, "also measure annealing for bd3lm")
    report_only: bool = knob(False, "do not train: score and report what is there")
    plot: str = knob("docs/img/adaptation.png", "the plot ('' = none)")


def run_name(variant: str, objective: str, seed: int) -> str:
    return f"{variant}_s{seed}" if variant.startswith("ar") else f"{objective}_{variant}_s{seed}"


def train(a: AdaptationConfig, name: str, objective: str, steps: int, seed: int, *extra: str) -> Path:
    """One pretrain.py run (skipped when its export exists); returns its out_dir."""
    out = Path(a.work_dir) / name
    if (out / "export" / "config.json").is_file():
        return out
    cmd = [sys.executable, "training/pretrain.py", "--config", f"{a.config_dir}/shakespeare_{objective}.json",
           f"--out_dir={out}", f"--max_iters={steps}", f"--batch_size={a.batch_size}", f"--seed={seed}",
           f"--eval_interval={max(steps // 10, 1)}", f"--checkpoint_interval={steps}", "--wandb_mode=disabled",
           "--no_tensorboard", "--no_progress_bar", "--log_interval=50",
           "--overwrite", *extra]  # a run there without its export did not finish: it starts over
    print(f"[{name}] {' '.join(cmd[1:])}", flush=True)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(OP_CACHE))}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return out


def train_grid(a: AdaptationConfig) -> None:
    S = a.steps
    for seed in a.seeds:
        ar_half = train(a, run_name("ar_half", "ar", seed), "ar", S // 2, seed)
        if seed == 0:
            train(a, "ar_judge_s0", "ar", S, seed)
        for obj in a.objectives:
            init = [f"--init_from={ar_half}/export"]
            train(a, run_name("scratch", obj, seed), obj, S, seed)
            train(a, run_name("scratch_half", obj, seed), obj, S // 2, seed)
            train(a, run_name("adapt", obj, seed), obj, S // 2, seed, *init)
            train(a, run_name("adapt_shift", obj, seed), obj, S // 2, seed, *init, "--model.shift")
            if obj == "mdlm" or a.anneal_all:
                train(a, run_name("adapt_anneal", obj, seed), obj, S // 2, seed, *init, "--model.shift",
                      f"--anneal_attention_iters={S // 4}")


# ----------------------------------------------------------------------------- scoring
def score(a: AdaptationConfig, out: Path, judge) -> dict:
    """val NELBO (own), NELBO given token 0, generative perplexity under the judge, for one export."""
    import torch
    from evaluation.generative_perplexity import generative_perplexity
    from inference.api import DecodeOptions, generate_with_stats
    from inference.loading import load_model
    from models.diffusion import NoiseSchedule, ar_loss, diffusion_nelbo, is_diffusion
    from training.data import TokenDataset

    loaded = load_model(ckpt=str(out / "export"), device="cpu", log=lambda *_: None)
    model, tok, obj = loaded.model, loaded.tokenizer, loaded.objective
    data_dir = json.loads((out / "export" / "config.json").read_text())["train_config"]["data_dir"]
    val = TokenDataset(data_dir, "val")
    own, given_first = [], []
    with torch.no_grad():
        for k, (x, y) in enumerate(val.val_batches(a.batch_size, model.config.block_size, a.eval_batches)):
            if not is_diffusion(obj):
                own.append(float(ar_loss(model, x, y, num_tokens=tok.mask_id)))  # tokens 1..T given token 0
                given_first.append(own[-1])
                continue
            kw = dict(block_length=model.config.block_length, seed=10_000 + k)
            sched = NoiseSchedule(loaded.schedule)
            own.append(float(diffusion_nelbo(model, x, obj, sched, tok.mask_id, **kw)))
            given_first.append(float(diffusion_nelbo(model, x, obj, sched, tok.mask_id, clean_prefix=1, **kw)))
    completions = generate_with_stats(model, tok, ["\n"] * a.samples, model.config.block_size - 1,
                           options=DecodeOptions(seed=1234, batch_size=a.samples))
    judged = generative_perplexity(judge.model, judge.tokenizer, completions, tok)
    return {"nelbo": statistics.fmean(own), "given_first": statistics.fmean(given_first),
            "gen_ppl": judged.perplexity, "gen_nats": judged.nats_per_token}


def mean_se(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return (values[0] if values else float("nan")), float("nan")
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def fmt(values: list[float]) -> str:
    m, se = mean_se(values)
    return f"{m:.3f}" if math.isnan(se) else f"{m:.3f} ± {se:.3f}"


def report(a: AdaptationConfig) -> dict:
    from inference.loading import load_model

    work = Path(a.work_dir)
    results_file = work / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    judge = load_model(ckpt=str(work / "ar_judge_s0" / "export"), device="cpu", log=lambda *_: None)
    for out in sorted(p for p in work.iterdir() if (p / "export" / "config.json").is_file()):
        stamp = (out / "export" / "config.json").stat().st_mtime
        if out.name not in results or results[out.name].get("stamp") != stamp:
            print(f"scoring {out.name}", flush=True)
            results[out.name] = {**score(a, out, judge), "stamp": stamp}
            results_file.write_text(json.dumps(results, indent=1))
    S = a.steps
    rows = [("ar_half", "ar", f"{S // 2} AR")]
    for obj in a.objectives:
        rows += [("scratch", obj, f"{S}"), ("scratch_half", obj, f"{S // 2}"), ("adapt", obj, f"{S // 2} AR + {S // 2}"),
                 ("adapt_shift", obj, f"{S // 2} AR + {S // 2}"), ("adapt_anneal", obj, f"{S // 2} AR + {S // 2}")]
    lines = ["| run | objective | steps | val NELBO | NELBO of tokens 1.. given token 0 | gen. PPL (AR judge) | seeds |",
             "|---|---|---|---|---|---|---|"]
    table = {}
    for variant, obj, steps in rows:
        got = [results[run_name(variant, obj, s)] for s in a.seeds if run_name(variant, obj, s) in results]
        if not got:
            continue
        table[(variant, obj)] = got
        label = {"ar_half": "AR (the start)", "scratch": "scratch", "scratch_half": "scratch", "adapt": "adapted",
                 "adapt_shift": "adapted + shift", "adapt_anneal": "adapted + shift + annealing"}[variant]
        lines.append(f"| {label} | {obj} | {steps} | {fmt([g['nelbo'] for g in got])} | "
                     f"{fmt([g['given_first'] for g in got])} | {fmt([g['gen_ppl'] for g in got])} | {len(got)} |")
    print("\n".join(lines))
    summary = headline(table, a.objectives)
    print("\n".join(summary))
    if a.plot:
        plot(a, work, a.plot)
    return {"table": lines, "summary": summary}


def headline(table: dict, objectives) -> list[str]:
    """The two headline comparisons, per objective, on the equal-terms score (tokens 1.. given token 0)."""
    out = []
    ar = [g["given_first"] for g in table.get(("ar_half", "ar"), [])]
    for obj in objectives:
        get = lambda v: [g["given_first"] for g in table.get((v, obj), [])]  # noqa: E731
        if get("scratch") and get("adapt_shift"):
            d = mean_se(get("scratch"))[0] - mean_se(get("adapt_shift"))[0]
            out.append(f"{obj}: adapted + shift vs scratch at equal total steps: {d:+.3f} nats "
                       f"({'adapted better' if d > 0 else 'scratch better'})")
        if ar and get("scratch_half") and get("adapt_shift"):
            gap_scratch = mean_se(get("scratch_half"))[0] - mean_se(ar)[0]
            gap_adapt = mean_se(get("adapt_shift"))[0] - mean_se(ar)[0]
            out.append(f"{obj}: gap to the AR start at equal adaptation steps: scratch {gap_scratch:.3f}, adapted + "
                       f"shift {gap_adapt:.3f} nats ({gap_adapt / gap_scratch:.0%} of scratch's)")
    return out


def plot(a: AdaptationConfig, work: Path, path: str) -> None:
    """val NELBO against total training steps (AR steps included), seed 0: scratch vs AR + adaptation."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from training.metrics import read_records

    fig, axes = plt.subplots(1, len(a.objectives), figsize=(6 * len(a.objectives), 4), squeeze=False)
    half = a.steps // 2
    for ax, obj in zip(axes[0], a.objectives):
        for variant, offset, style in (("ar_half", 0, "k:"), ("scratch", 0, "C0-"), ("adapt", half, "C1--"),
                                       ("adapt_shift", half, "C2-"), ("adapt_anneal", half, "C3-.")):
            out = work / run_name(variant, obj, a.seeds[0])
            evals = read_records(out, "eval") if out.is_dir() else []
            if evals:
                label = "AR (val loss)" if variant == "ar_half" else variant.replace("_", " + ")
                ax.plot([r["step"] + offset for r in evals], [r["val_loss"] for r in evals], style, label=label)
        ax.set(title=f"{obj}: from scratch vs adapted from the AR model", xlabel="total training steps (AR + diffusion)",
               ylabel="val NELBO (nats/char)", ylim=(1.4, 3.5))
        ax.grid(alpha=0.3)
        ax.legend()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main(argv=None):
    a = parse_cli(AdaptationConfig, argv, prog="python -m bench.adaptation", description=__doc__)
    if not a.report_only:
        train_grid(a)
    report(a)


if __name__ == "__main__":
    main()
