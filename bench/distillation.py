"""Few-step sampling after distillation: the teacher and each round's student at L, L/2, L/4, L/8 model calls.

    python -m bench.distillation --teacher out/shakespeare_mdlm --distilled out/shakespeare_mdlm_distill \\
        --judge out/shakespeare_ar --out docs/img/distillation.json --plot docs/img/distillation.png

For every model and every step budget T in {L, L/2, L/4, L/8} it draws `num_samples` unconditional
samples of L tokens (the model's whole canvas, temperature 1, no top-k: the numbers describe the model's
distribution) under each of `seeds`, and scores them as evaluation/generative_quality.py does:
  gen PPL   generative perplexity under the AR judge (lower = more fluent to the judge)
  entropy   unigram entropy of each sample, averaged (nats): a sampler that repeats itself lowers its
            gen PPL, and shows here
Rows: the teacher decoded ancestrally (T steps: at most T calls, fewer when a step unmasks nothing) and by
top-k confidence (L / T tokens per call, exactly T calls; LLaDA's low-confidence rule, the best confidence
rule of bench.decoding at these budgets), and every round's student decoded ancestrally; plus real val
text scored the same way. Each cell is the mean over the seeds +- their standard deviation.
Checked at the end (`targets` in the JSON), against the teacher's ancestral sampler at T = L (the sampler
round 1 distils): the student distilled for L/4 steps within 10% of its gen PPL at L/4 calls, the one for
L/8 within 20% at L/8, and their entropy within 5% of its entropy.
`--distilled RUN` reads the run's rounds (RUN/rounds/round_k, the last round in RUN/export) and the
distillation record each export carries (teacher, steps, divergence) with the run's learning rate.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a script: find the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from common.config import knob, parse_cli, run_or_exit
from evaluation.evaluate import split_windows
from evaluation.generative_quality import score_samples
from inference.api import generate_with_stats
from inference.loading import LoadedModel, load_model
from training.data import load_meta, read_split
from training.distillation import round_dir

TARGETS = {4: 1.10, 8: 1.20}  # budget divisor -> largest gen PPL ratio to the teacher at L calls
ENTROPY_TOLERANCE = 0.05


@dataclass
class BenchConfig:
    teacher: str = knob("", "the teacher (an export or a run dir)")
    distilled: str = knob("", "the distillation run dir (its rounds/round_k and export/)")
    judge: str = knob("", "the AR judge (an export or run dir of the same tokenizer)")
    budgets: list[int] = knob([1, 2, 4, 8], "model-call budgets as divisors of L: T = L / d steps")
    num_samples: int = knob(64, "samples per model, budget and seed")
    seeds: list[int] = knob([0, 1, 2], "decoding seeds (sample i of seed s draws from seed s * 100003 + i)")
    gen_length: int = knob(0, "L: tokens per sample (0 = the teacher's whole context)")
    batch_size: int = knob(64, "samples decoded together")
    threads: Optional[int] = knob(None, "torch CPU threads (none: torch's choice)")
    out: str = knob("", "write the rows and the checks as JSON here")
    plot: str = knob("", "write the gen PPL / entropy plot (PNG) here")


@dataclass
class Row:
    model: str  # "teacher" | "student round k (N steps)" | "data"
    rule: str  # "ancestral" | "top-k" | "-"
    steps: Optional[int]
    calls: Optional[float] = None  # model calls per sample (mean)
    gen_ppl: Optional[float] = None  # mean over seeds
    gen_ppl_sd: float = 0.0
    entropy: Optional[float] = None
    entropy_sd: float = 0.0
    per_seed: Optional[list] = None
    example: str = ""


def students_of(run: str) -> list[tuple[int, str]]:
    """(round, export dir) of every round of a distillation run, the last one from its export/."""
    out_dir = Path(run)
    k, found = 1, []
    while (round_dir(out_dir, k) / "config.json").is_file():
        found.append((k, str(round_dir(out_dir, k))))
        k += 1
    if not (out_dir / "export" / "config.json").is_file():
        raise FileNotFoundError(f"--distilled {run}: no export/ (the last round's student); is the run finished?")
    found.append((k, str(out_dir / "export")))
    return found


def decode_and_score(loaded: LoadedModel, judge: LoadedModel, L: int, rule: str, steps: int, args) -> dict:
    knobs = dict(steps=steps) if rule == "ancestral" else dict(tokens_per_step=L // steps)
    per_seed = []
    for s in args.seeds:
        done = generate_with_stats(loaded.model, loaded.tokenizer, [""] * args.num_samples, L,
                                   "ancestral" if rule == "ancestral" else "topk", temperature=1.0, top_k=None,
                                   stop_at_eot=False, schedule=loaded.schedule, batch_size=args.batch_size,
                                   seed=s * 100003, **knobs)
        r = score_samples([c.token_ids for c in done], [[] for _ in done], loaded.tokenizer, judge.model)
        per_seed.append({"seed": s, "gen_ppl": r["gen_ppl"], "entropy": r["unigram_entropy"],
                         "calls": sum(c.nfe for c in done) / len(done), "example": done[0].text})
    return {"per_seed": per_seed}


def summarise(row: Row, per_seed: list[dict]) -> Row:
    ppl, ent = [p["gen_ppl"] for p in per_seed], [p["entropy"] for p in per_seed]
    row.gen_ppl, row.entropy = statistics.mean(ppl), statistics.mean(ent)
    row.gen_ppl_sd = statistics.stdev(ppl) if len(ppl) > 1 else 0.0
    row.entropy_sd = statistics.stdev(ent) if len(ent) > 1 else 0.0
    row.calls = statistics.mean(p["calls"] for p in per_seed) if per_seed[0].get("calls") is not None else None
    row.per_seed, row.example = per_seed, per_seed[0]["example"]
    return row


def check_targets(rows: list[Row], L: int, students: dict[int, int]) -> list[dict]:
    """students: steps -> round of the student distilled for them."""
    ref = next(r for r in rows if r.model == "teacher" and r.rule == "ancestral" and r.steps == L)
    out = []
    for d, limit in TARGETS.items():
        T = L // d
        if T not in students:
            continue
        name = student_name(students[T], T)
        r = next((r for r in rows if r.model == name and r.steps == T), None)
        if r is None:
            continue
        ratio, ent = r.gen_ppl / ref.gen_ppl, r.entropy / ref.entropy
        out.append({"calls": f"L/{d}", "student": name, "gen_ppl": r.gen_ppl, "teacher_gen_ppl_at_L": ref.gen_ppl,
                    "ratio": ratio, "limit": limit, "entropy_ratio": ent,
                    "met": ratio <= limit and abs(ent - 1) <= ENTROPY_TOLERANCE})
    return out


def student_name(k: int, steps: int) -> str:
    return f"student round {k} ({steps} steps)"


def markdown_table(rows: list[Row]) -> str:
    lines = ["| model | decoding | steps | calls per sample | gen PPL (mean ± sd over seeds) | entropy (nats) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        steps = "-" if r.steps is None else str(r.steps)
        calls = "-" if r.calls is None else f"{r.calls:.1f}"
        lines.append(f"| {r.model} | {r.rule} | {steps} | {calls} | {r.gen_ppl:.2f} ± {r.gen_ppl_sd:.2f} | "
                     f"{r.entropy:.3f} ± {r.entropy_sd:.3f} |")
    return "\n".join(lines)


def plot(rows: list[Row], L: int, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    series = {}
    for r in rows:
        if r.steps is not None:
            series.setdefault(f"{r.model}, {r.rule}", []).append(r)
    for name, rs in series.items():
        rs = sorted(rs, key=lambda r: r.steps)
        style = "--" if "top-k" in name else "-"
        a.errorbar([r.steps for r in rs], [r.gen_ppl for r in rs], [r.gen_ppl_sd for r in rs], fmt=style + "o",
                   label=name, capsize=3)
        b.errorbar([r.steps for r in rs], [r.entropy for r in rs], [r.entropy_sd for r in rs], fmt=style + "o",
                   label=name, capsize=3)
    data = next((r for r in rows if r.model == "data"), None)
    for ax, value in ((a, data and data.gen_ppl), (b, data and data.entropy)):
        if value is not None:
            ax.axhline(value, color="grey", lw=0.8, ls=":", label="real text")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"ancestral steps / top-k calls (L = {L})")
    a.set_ylabel("gen PPL under the AR judge")
    b.set_ylabel("unigram entropy of samples (nats)")
    a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run(args, log=print) -> dict:
    for name in ("teacher", "distilled", "judge"):
        if not getattr(args, name):
            raise ValueError(f"give --{name} (see --help)")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    teacher = load_model(ckpt=args.teacher, device="cpu", log=log)
    judge = load_model(ckpt=args.judge, device="cpu", log=log)
    if judge.objective != "ar":
        raise ValueError(f"--judge {args.judge} is a {judge.objective} model; the judge must be autoregressive")
    if judge.tokenizer.to_meta() != teacher.tokenizer.to_meta():
        raise ValueError(f"--judge {args.judge} reads other token ids than the teacher; use an AR model trained on "
                         f"the same data")
    L = args.gen_length or teacher.model.config.block_size
    if any(L % d for d in args.budgets):
        raise ValueError(f"L={L} is not divisible by every budget divisor {args.budgets}")
    students = [(k, load_model(ckpt=d, device="cpu", log=log)) for k, d in students_of(args.distilled)]
    tried = []
    rows = []
    data_dir = (teacher.info.get("train_config") or {}).get("data_dir")
    if data_dir and Path(data_dir, "meta.json").is_file():  # real text: where entropy and gen PPL sit for data
        meta = load_meta(data_dir)
        windows = split_windows(read_split(data_dir, "val", meta), L, args.num_samples * len(args.seeds))
        per_seed = []
        for i, s in enumerate(args.seeds):
            real = [w.tolist() for w in windows[i * args.num_samples:(i + 1) * args.num_samples]]
            r = score_samples(real, [[] for _ in real], teacher.tokenizer, judge.model)
            per_seed.append({"seed": s, "gen_ppl": r["gen_ppl"], "entropy": r["unigram_entropy"], "calls": None,
                             "example": teacher.tokenizer.decode(real[0])})
        rows.append(summarise(Row("data", "-", None), per_seed))
    plan = [("teacher", teacher, rule) for rule in ("ancestral", "top-k")]
    plan += [(student_name(k, s.model.distilled_steps), s, "ancestral") for k, s in students]
    for name, loaded, rule in plan:
        for d in args.budgets:
            t0 = time.perf_counter()
            row = summarise(Row(name, rule, L // d), decode_and_score(loaded, judge, L, rule, L // d, args)["per_seed"])
            rows.append(row)
            log(f"  {name:<28} {rule:<9} T={L // d:<3} calls {row.calls:5.1f}  gen PPL {row.gen_ppl:7.2f} "
                f"+-{row.gen_ppl_sd:.2f}  entropy {row.entropy:.3f}  ({time.perf_counter() - t0:.0f} s)")
    for k, s in students:
        record = s.info.get("distillation") or {}
        train = s.info.get("train_config") or {}
        tried.append({"round": k, "steps": record.get("steps"), "teacher_steps": record.get("teacher_steps"),
                      "divergence": record.get("divergence"), "round_iters": record.get("round_iters"),
                      "learning_rate": train.get("learning_rate"), "min_lr": train.get("min_lr"),
                      "batch": train.get("batch_size")})
    targets = check_targets(rows, L, {s.model.distilled_steps: k for k, s in students})
    log(markdown_table(rows))
    for t in targets:
        log(f"at {t['calls']} calls: {t['student']} gen PPL {t['gen_ppl']:.2f} = x{t['ratio']:.3f} of the "
            f"teacher's {t['teacher_gen_ppl_at_L']:.2f} at L calls (bound x{t['limit']:.2f}), entropy "
            f"x{t['entropy_ratio']:.3f}: within both bounds: {'yes' if t['met'] else 'no'}")
    result = {"config": asdict(args), "L": L, "teacher": teacher.source, "judge": judge.source, "rounds": tried,
              "rows": [asdict(r) for r in rows], "targets": targets}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        log(f"wrote {args.out}")
    if args.plot:
        plot(rows, L, args.plot)
        log(f"wrote {args.plot}")
    return result


def main(argv=None):
    args = parse_cli(BenchConfig, argv, prog="python -m bench.distillation", description=__doc__)
    return run_or_exit(run, args, (ValueError, FileNotFoundError))


if __name__ == "__main__":
    main()
