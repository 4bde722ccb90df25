"""The bound-vs-T study, end to end, in one command:

    python -m evaluation.study --out_dir results/study            # default size (~40 min on a 2-core CPU)
    python -m evaluation.study --out_dir results/quick --quick    # CI size (~1-2 min)

1. prepare the bundled corpus (Shakespeare, char tokenizer) into OUT/data;
2. train an AR model and an MDLM model of the same size on the same tokens (same batch, steps, seed)
   with the real launcher: `deepspeed --num_gpus N training/pretrain.py --config OUT/configs/X.json`
   (on a machine without GPUs: DS_ACCELERATOR=cpu, N ranks of one thread each), auto-exported to OUT/X/export;
3. evaluate both on the same val windows (python -m evaluation.evaluate): exact AR PPL, the continuous
   NELBO and the T-step NELBO for every T, with standard errors -> OUT/results.{json,md}, OUT/bound_vs_steps.png,
   tensorboard OUT/tb, wandb (offline unless a key is configured);
4. generative quality: samples of each decoding rule and step count scored by the AR model as judge
   (gen PPL) plus their unigram entropy -> OUT/generative_quality.{json,md};
5. OUT/study.md: both tables, the plot, the commands, timings and the machine.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: find the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import parse_cli
from common.ports import free_port
from training.cpu_comm_op import OP_CACHE
from training.metrics import resolve_wandb_mode

REPO = Path(__file__).resolve().parents[1]

# Sizes. Both objectives get the same model, batch, steps and seed: the same tokens and compute.
SIZES = {
    "default": dict(model=dict(block_size=128, n_layer=4, n_head=4, n_embd=128), batch_size=16, max_iters=1200,
                    learning_rate=2e-3, min_lr=2e-4, warmup_iters=60,
                    eval=dict(max_windows=128, samples_per_window=32),
                    genq=dict(length=128, num_samples=16, steps=[16, 32, 64, 128])),
    "quick": dict(model=dict(block_size=64, n_layer=2, n_head=2, n_embd=64), batch_size=8, max_iters=40,
                  learning_rate=3e-3, min_lr=3e-4, warmup_iters=5,
                  eval=dict(max_windows=8, samples_per_window=8, steps=[8, 32, 128]),
                  genq=dict(length=32, num_samples=4, steps=[8, 32])),
}


def train_config(objective: str, size: dict, data_dir: Path) -> dict:
    """A training config (training/config.py keys) for one objective of the study."""
    return {
        "data_dir": str(data_dir),
        "model": {**size["model"], "bias": False, "dropout": 0.0,
                  "attention": "causal" if objective == "ar" else "bidirectional"},
        "objective": {"name": objective, "schedule": "loglinear"},
        "batch_size": size["batch_size"],
        "gradient_accumulation_steps": 1,
        "learning_rate": size["learning_rate"],
        "min_lr": size["min_lr"],
        "warmup_iters": size["warmup_iters"],
        "max_iters": size["max_iters"],
        "eval_interval": max(size["max_iters"] // 4, 1),
        "eval_iters": 4,
        "log_interval": max(size["max_iters"] // 20, 1),
        "checkpoint_interval": 0,
        "keep_checkpoints": 1,
        "seed": 1337,
        "wandb_mode": "disabled",  # the study logs its evaluation; the two training runs are not the point
        "tensorboard": False,
        "progress_bar": False,
    }


def deepspeed_launcher() -> str:
    beside = Path(sys.executable).parent / "deepspeed"
    found = str(beside) if beside.is_file() else shutil.which("deepspeed")
    if not found:
        raise FileNotFoundError("the `deepspeed` launcher is not installed (pip install -r requirements.txt)")
    return found


def run_logged(cmd: list[str], log_path: Path, env: dict, what: str) -> float:
    """Run cmd with its output in log_path; on failure show the log's tail and stop the study."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"[study] {what}: {' '.join(cmd)}  (log: {log_path})", flush=True)
    t0 = time.time()
    with open(log_path, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if rc != 0:
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-40:])
        raise RuntimeError(f"{what} failed (exit {rc}); last lines of {log_path}:\n{tail}")
    return time.time() - t0


def train(objective: str, size: dict, out: Path, num_gpus: int, env: dict) -> tuple[Path, float]:
    cfg_path = out / "configs" / f"{objective}.json"
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(json.dumps(train_config(objective, size, out / "data"), indent=2) + "\n")
    run_dir = out / objective
    cmd = [deepspeed_launcher(), "--num_gpus", str(num_gpus), "--master_port", str(free_port()),
           "training/pretrain.py", "--config", str(cfg_path), "--out_dir", str(run_dir)]
    seconds = run_logged(cmd, out / "logs" / f"train_{objective}.log", env, f"train {objective}")
    return run_dir / "export", seconds


def machine() -> str:
    import torch
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()}-core CPU ({cpu}), no GPU"


def final_train_loss(run_dir: Path) -> dict:
    """The last train/eval records of a run's metrics.jsonl (what pretrain.py logged)."""
    from training.metrics import read_records  # the owner of metrics.jsonl: skips a torn last line

    out = {}
    for rec in read_records(run_dir):
        if rec.get("kind") in ("train", "eval", "done"):
            out[rec["kind"]] = rec
    return out


def study_markdown(results: dict, genq_rows: list, info: dict) -> str:
    from evaluation.evaluate import markdown_table
    from evaluation.generative_quality import markdown_table as genq_table

    lines = [f"# Bound-vs-T study ({info['size']})", "",
             f"Command: `{info['command']}`  ", f"Machine: {info['machine']}  ",
             f"Wall time: {info['seconds_total'] / 60:.1f} min (train AR {info['seconds_train']['ar'] / 60:.1f}, "
             f"train MDLM {info['seconds_train']['mdlm'] / 60:.1f}, evaluate {info['seconds_eval'] / 60:.1f}, "
             f"generative quality {info['seconds_genq'] / 60:.1f})  ",
             f"Both models: {info['params']:,} parameters, {info['tokens_per_model']:,} training tokens each "
             f"(char-level Shakespeare, context {info['block_size']}).", "",
             "## Validation NELBO / PPL bound vs number of timesteps T", "",
             markdown_table(results), "",
             "![bound vs T](bound_vs_steps.png)", "",
             "## Generative quality (judge: the AR model; temperature 1, unconditional)", "",
             genq_table(genq_rows)]
    for r in genq_rows:
        lines.append(f"- {r['model']} / {r['strategy']} {r.get('steps') or ''}: "
                     f"`{r['example'][:100]!r}`")
    return "\n".join(lines) + "\n"


@dataclass
class StudyConfig:
    out_dir: str = field(default="results/study", metadata={"help": "data, both runs, results, plots, study.md"})
    quick: bool = field(default=False, metadata={"help": "the CI size (~1-2 minutes on a 2-core CPU)"})
    max_iters: int = field(default=0, metadata={"help": "override the training steps of both models (0 = the size's)"})
    num_gpus: int = field(default=0, metadata={"help": "ranks per model (0 = every GPU, or 2 CPU ranks on a machine "
                                                       "without GPUs)"})
    steps: list[int] = field(default_factory=list, metadata={"help": "T values of the discrete bounds (empty = "
                                                                      "8,...,1024)"})
    reuse: bool = field(default=False, metadata={"help": "keep OUT/{ar,mdlm}/export and OUT/results.json from an "
                                                         "earlier run; redo the rest"})
    genq: bool = field(default=True, metadata={"help": "the generative-quality table"})
    wandb_mode: str = field(default="auto", metadata={"help": "wandb of the evaluation",
                                                      "choices": ("auto", "online", "offline", "disabled")})


def main(argv=None) -> dict:
    a = parse_cli(StudyConfig, argv, prog="python -m evaluation.study", description=__doc__.split("\n\n")[0])

    import torch

    size_name = "quick" if a.quick else "default"
    size = json.loads(json.dumps(SIZES[size_name]))
    if a.max_iters:
        size["max_iters"] = a.max_iters
    out = Path(a.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    gpus = torch.cuda.device_count()
    num_gpus = a.num_gpus or (gpus if gpus else 2)
    env = dict(os.environ)
    if not gpus:
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")  # one thread per rank: 2 ranks on 2 cores
        # the shm communication op DeepSpeed builds on CPU (~40 s): the cache launch.sh and the benchmarks use
        env.setdefault("TORCH_EXTENSIONS_DIR", str(OP_CACHE))
    env.setdefault("WANDB_MODE", resolve_wandb_mode())
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    t_start = time.time()

    # 1. data
    data = out / "data"
    if not (data / "meta.json").is_file():
        run_logged([sys.executable, "-m", "training.prepare", "--source", "shakespeare", "--tokenizer", "char",
                    "--out", str(data)], out / "logs" / "prepare.log", env, "prepare")

    # 2. train both objectives on the same tokens
    exports, seconds_train = {}, {}
    for objective in ("ar", "mdlm"):
        export = out / objective / "export"
        if a.reuse and (export / "config.json").is_file():
            exports[objective], seconds_train[objective] = export, 0.0
            print(f"[study] reusing {export}")
            continue
        exports[objective], seconds_train[objective] = train(objective, size, out, num_gpus, env)

    # 3. evaluate both on the same windows
    from evaluation.evaluate import EvalConfig, evaluate, split_windows
    from inference.loading import load_model
    from training.data import load_meta, read_split
    from evaluation.generative_quality import generative_quality, markdown_table as genq_table
    from models.tokenizer import tokenizer_from_meta

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    ecfg = EvalConfig(model=[str(exports["mdlm"]), str(exports["ar"])], data_dir=str(data), out_dir=str(out),
                      wandb_mode=a.wandb_mode, wandb_run_name=f"study-{size_name}", **size["eval"])
    if a.steps:
        ecfg.steps = list(a.steps)
    t0 = time.time()
    previous = out / "results.json"
    if a.reuse and previous.is_file() and json.loads(previous.read_text()).get("models"):
        results = json.loads(previous.read_text())  # the evaluation of the reused models
        seconds_eval = results.get("study", {}).get("seconds_eval", results.get("seconds", 0.0))
        print(f"[study] reusing the evaluation in {previous}")
    else:
        results = evaluate(ecfg)
        seconds_eval = time.time() - t0

    # 4. generative quality, judged by the study's AR model
    t0 = time.time()
    genq_rows = []
    if a.genq:
        meta = load_meta(data)
        tokenizer = tokenizer_from_meta(meta)
        models = {name: load_model(ckpt=str(exports[name]), device="cpu") for name in ("mdlm", "ar")}
        loaded = [(name, m.model, m.info) for name, m in models.items()]
        judge = loaded[1][1]
        g = size["genq"]
        windows = split_windows(read_split(data, "val", meta), g["length"], g["num_samples"])
        genq_rows = generative_quality(loaded, tokenizer, judge, "ar", windows, g["length"], g["num_samples"],
                                       steps=g["steps"], seed=0)
        (out / "generative_quality.json").write_text(json.dumps(genq_rows, indent=2, ensure_ascii=False) + "\n")
        (out / "generative_quality.md").write_text(genq_table(genq_rows))
    seconds_genq = time.time() - t0

    # 5. the report
    params = results["models"][0]["params"]
    info = {"size": size_name, "command": "python -m evaluation.study --out_dir " + a.out_dir +
            (" --quick" if a.quick else ""), "machine": machine(), "num_ranks": num_gpus,
            "seconds_total": time.time() - t_start, "seconds_train": seconds_train, "seconds_eval": seconds_eval,
            "seconds_genq": seconds_genq, "params": params, "block_size": size["model"]["block_size"],
            "tokens_per_model": size["max_iters"] * size["batch_size"] * size["model"]["block_size"] * num_gpus,
            "train_logs": {o: final_train_loss(out / o) for o in ("ar", "mdlm")}, "size_config": size}
    results["study"] = info
    results["generative_quality"] = genq_rows
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    (out / "study.md").write_text(study_markdown(results, genq_rows, info))
    print(f"[study] done in {info['seconds_total'] / 60:.1f} min: {out / 'study.md'}, {out / 'results.json'}, "
          f"{out / 'bound_vs_steps.png'}")
    return results


if __name__ == "__main__":
    try:
        main()
    except (RuntimeError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1)
