"""Evaluation: exact perplexity of AR models and the NELBO bound-vs-T study of diffusion models.

    python -m evaluation.evaluate --model out/mdlm --model out/ar --data_dir data/shakespeare_char --out_dir results/eval
    python -m evaluation.evaluate --init_from gpt2 --data_dir data/openwebtext --splits train,val   # GPT-2 baseline
    python -m evaluation.evaluate --config evaluation/configs/eval_gpt2.json

For every model and split it reads the same deterministic windows (evenly spaced over the split, so
with enough windows the split is covered end to end) and reports, in nats per token:
  AR (causal)   the mean next-token cross-entropy over every predicted token; PPL = exp(mean CE), exact.
  MDLM          the continuous-time NELBO and the T-step NELBO for each T in --steps, PPL bound = exp(NELBO).
  BD3-LM        the same two bounds of block diffusion (block_diffusion_loss: one t per block, each block
                conditioned on the clean blocks before it); the window length must be whole blocks.
The NELBOs are Monte-Carlo estimates: every window is repeated --samples_per_window times with
antithetic (evenly spaced) diffusion times, and the standard error comes from the spread of the
per-window estimates. Every estimator sees the same windows with the same seeds, so the noise that
decides which tokens are masked is shared (common random numbers): L_T - L_inf is estimated with a
standard error far smaller than that of L_T itself, and that paired error is reported too.

Writes OUT/results.json, OUT/results.md (a Markdown table) and OUT/bound_vs_steps.png, and logs the
same to tensorboard (OUT/tb) and to wandb (offline unless a WANDB_API_KEY is set; never blocks).
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: find the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import parse_cli
from models.diffusion import NoiseSchedule, diffusion_nelbo, next_token_nll
from inference import loading
from training.data import load_meta, read_split
from training.metrics import resolve_wandb_mode

DEFAULT_STEPS = (8, 16, 32, 64, 128, 256, 1024)


# ----------------------------------------------------------------------------- configuration
@dataclass
class EvalConfig:
    model: list[str] = field(default_factory=list, metadata={"help": "consolidated model dirs (or training out dirs "
                                                                       "with export/); repeat --model for several"})
    init_from: str = field(default="", metadata={"help": 'a GPT-2 checkpoint: hub name (gpt2, gpt2-medium, ...) or a save_pretrained dir'})
    data_dir: str = field(default="", metadata={"help": 'prepared dataset dir (train.bin, val.bin, meta.json)'})
    splits: list[str] = field(default_factory=lambda: ["val"], metadata={"help": "splits to score: train, val"})
    steps: list[int] = field(default_factory=lambda: list(DEFAULT_STEPS), metadata={"help": 'T of the discrete bounds'})
    continuous: bool = field(default=True, metadata={"help": 'also estimate the continuous-time bound (T = infinity)'})
    block_size: int = field(default=0, metadata={"help": "window length; 0 = the model's context"})
    max_windows: int = field(default=64, metadata={"help": 'windows per split (evenly spaced; fewer when the split is short)'})
    samples_per_window: int = field(default=32, metadata={"help": 'Monte-Carlo samples of t per window and estimator (MDLM)'})
    batch_size: int = field(default=8, metadata={"help": 'windows per forward pass (AR)'})
    seed: int = field(default=1234, metadata={"help": 'base seed of the Monte-Carlo noise, shared by every estimator (common random numbers)'})
    device: str = field(default="auto", metadata={"help": 'auto | cpu | cuda'})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0 = torch's default)"})
    out_dir: str = field(default="", metadata={"help": 'where results.json / results.md / bound_vs_steps.png go ("" = print only)'})
    wandb_mode: str = field(default="auto", metadata={"help": 'auto (online with an API key, else offline) | online | offline | disabled'})
    wandb_project: str = field(default="diffusiongpt-eval", metadata={"help": "wandb project"})
    wandb_run_name: str = field(default="", metadata={"help": "wandb run name ('' = wandb's)"})
    tensorboard: bool = field(default=True, metadata={"help": 'OUT/tb event files'})

    def __post_init__(self):
        if isinstance(self.model, str):
            self.model = [self.model] if self.model else []
        if isinstance(self.splits, str):
            self.splits = [s for s in self.splits.split(",") if s]
        if isinstance(self.steps, str):
            self.steps = parse_steps(self.steps)
        self.steps = [int(T) for T in self.steps]

    def validate(self) -> None:
        if not self.model and not self.init_from:
            raise ValueError("nothing to evaluate: pass --model DIR (repeatable) or --init_from gpt2|HF_DIR")
        if not self.data_dir:
            raise ValueError("--data_dir DIR (a prepared dataset with meta.json) is required")
        bad = [T for T in self.steps if T < 1]
        if bad:
            raise ValueError(f"--steps must be positive integers (the number of diffusion timesteps T); got {bad}")
        bad_splits = sorted(set(self.splits) - {"train", "val"})
        if bad_splits or not self.splits:
            raise ValueError(f"--splits must be a comma list of train,val; got {self.splits}")
        for name in ("max_windows", "samples_per_window", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.wandb_mode not in ("auto", "online", "offline", "disabled"):
            raise ValueError(f"--wandb_mode must be auto | online | offline | disabled, got {self.wandb_mode!r}")
        if self.block_size < 0:
            raise ValueError(f"--block_size must be >= 0 (0 = the model's context), got {self.block_size}")


def parse_steps(text: str) -> list[int]:
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--steps takes a comma list of integers such as 8,32,128; got {text!r}") from None
    if not steps:
        raise ValueError("--steps is empty")
    return steps


def load_config(argv=None) -> EvalConfig:
    """Defaults < --config FILE (.json or .toml) < command-line flags (common/config.py), validated.
    --model is repeatable; --splits and --steps take comma lists; --no-continuous / --no-tensorboard."""
    cfg = parse_cli(EvalConfig, argv, prog="python -m evaluation.evaluate", description=__doc__.split("\n\n")[0])
    cfg.validate()
    return cfg


# ----------------------------------------------------------------------------- models and data
def resolve_model_dir(path) -> Path:
    """A consolidated model dir, or a training out dir whose export/ holds one."""
    p = Path(path)
    if not (p / "config.json").is_file() and (p / "export" / "config.json").is_file():
        return p / "export"
    return p


def objective_of(info: dict) -> str:
    obj = info.get("objective") or {}
    name = obj.get("name") if isinstance(obj, dict) else obj
    if name is None:  # older exports: infer from the attention mask
        name = "ar" if info["model"].get("attention", "causal") == "causal" else "mdlm"
    return name


def tokenizer_fingerprint(tok) -> dict:
    """The parts of a tokenizer description that decide which id means which text."""
    if isinstance(tok, str):
        return {"tokenizer": tok}
    if not isinstance(tok, dict):
        return {}
    name = tok.get("tokenizer", tok.get("name"))
    fp = {"tokenizer": name, "vocab_size": tok.get("vocab_size")}
    if "chars" in tok:
        fp["chars"] = tok["chars"]
    return {k: v for k, v in fp.items() if v is not None}


def check_tokenizer_matches(loaded: loading.LoadedModel, meta: dict, model_name: str, data_dir) -> None:
    """Refuse to score data tokenized differently from what the model was trained on."""
    mine = tokenizer_fingerprint(loaded.tokenizer.to_meta())
    theirs = tokenizer_fingerprint(meta)
    if not mine:
        print(f"warning: {model_name} records no tokenizer; assuming it matches {data_dir}", file=sys.stderr)
    for key in ("tokenizer", "vocab_size", "chars"):
        if key in mine and key in theirs and mine[key] != theirs[key]:
            what = "character set" if key == "chars" else key
            raise ValueError(
                f"tokenizer mismatch: {model_name} was trained with {mine.get('tokenizer')!r} "
                f"(vocab {mine.get('vocab_size')}) but {data_dir} was prepared with {theirs.get('tokenizer')!r} "
                f"(vocab {theirs.get('vocab_size')}): the {what} differs. Prepare the data with the model's "
                f"tokenizer (python -m training.prepare --tokenizer ...) or evaluate a matching model.")
    vocab = meta.get("vocab_size")
    if vocab is not None and vocab > loaded.model.config.vocab_size:
        raise ValueError(f"{data_dir} has {vocab} token ids but {model_name} has only "
                         f"{loaded.model.config.vocab_size} embedding rows: the tokenizers differ")


def split_windows(tokens: np.ndarray, length: int, max_windows: int, split: str = "val") -> torch.Tensor:
    """(N, length) windows evenly spaced over the split, always the same ones (no randomness):
    non-overlapping and covering the split when it holds at most max_windows of them."""
    n = len(tokens)
    if n < length:
        raise ValueError(f"the {split} split has {n} tokens, fewer than one window of {length} "
                         f"(the context plus the AR target): prepare more data, raise --val_fraction, "
                         f"or evaluate with a smaller --block_size")
    count = min(max_windows, n // length)
    starts = np.linspace(0, n - length, count).round().astype(np.int64) if count > 1 else np.zeros(1, np.int64)
    return torch.from_numpy(np.stack([np.asarray(tokens[s:s + length], dtype=np.int64) for s in starts]))


# ----------------------------------------------------------------------------- estimators
@torch.no_grad()
def ar_window_nll(model, windows: torch.Tensor, batch_size: int = 8, num_tokens: int | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of each window (N, L+1) -> (N,) nats per token (L targets each).
    num_tokens: the softmax runs over the real ids only (rows past them are MASK and padding), as in training."""
    out = []
    for i in range(0, len(windows), batch_size):
        w = windows[i:i + batch_size].to(next(model.parameters()).device)
        out.append(next_token_nll(model, w[:, :-1], w[:, 1:], num_tokens).mean(1).cpu())  # (B,)
    return torch.cat(out)


@torch.no_grad()
def diffusion_window_nelbo(model, windows: torch.Tensor, schedule: NoiseSchedule, mask_id: int,
                           num_steps: Optional[int], samples_per_window: int, seed: int,
                           t_min: float = 1e-3, objective: str = "mdlm", block_length: int = 0) -> torch.Tensor:
    """NELBO of each window (N, L) -> (N,) nats per token, each the mean of samples_per_window samples.
    objective "mdlm" (masked_diffusion_loss) or "bd3lm" (block_diffusion_loss with block_length).

    Window w is repeated K = samples_per_window times in one batch, so the antithetic sampler spreads
    its K diffusion times (K * L / block_length for bd3lm: one per block) evenly over [0, 1). Its seed is
    seed + 2 w (the losses use seed and seed + 1) whatever num_steps is: every estimator shares the
    uniforms that choose t and the mask, so for the same window the masked set only grows with t
    (common random numbers)."""
    device = next(model.parameters()).device
    out = torch.empty(len(windows), dtype=torch.float64)
    for i, w in enumerate(windows):
        x0 = w.to(device).unsqueeze(0).expand(samples_per_window, -1).contiguous()  # (K, L)
        out[i] = diffusion_nelbo(model, x0, objective, schedule, mask_id, seed=seed + 2 * i, block_length=block_length,
                                 num_steps=num_steps, t_min=t_min, antithetic=True, masking_impl="torch").item()
    return out


def mean_and_stderr(x: torch.Tensor) -> tuple[float, float]:
    x = x.double()
    se = float(x.std(unbiased=True) / math.sqrt(len(x))) if len(x) > 1 else float("nan")
    return float(x.mean()), se


def evaluate_model(model, info: dict, name: str, windows_by_split: dict, cfg: EvalConfig,
                   log=print) -> dict:
    """Every number for one model. windows_by_split: split -> (N, L+1) windows."""
    objective = objective_of(info)
    res = {"name": name, "objective": objective, "params": model.num_params(),
           "block_size": None, "splits": {}}
    for split, windows in windows_by_split.items():
        t0 = time.time()
        if objective == "ar":
            per_window = ar_window_nll(model, windows, cfg.batch_size, num_tokens=info.get("mask_id"))
            loss, se = mean_and_stderr(per_window)
            L = windows.size(1) - 1
            entry = {"loss": loss, "loss_stderr": se, "ppl": math.exp(loss), "windows": len(windows),
                     "tokens": len(windows) * L}
            log(f"[{name}] {split}: loss {loss:.4f} ± {se:.4f} nats/token, PPL {math.exp(loss):.3f} "
                f"({len(windows)} windows x {L} tokens, {time.time() - t0:.1f}s)")
        else:
            obj = info.get("objective") or {}
            schedule = NoiseSchedule(obj.get("schedule", "loglinear"))
            t_min = obj.get("t_min", 1e-3)
            mask_id = info.get("mask_id")
            if mask_id is None:
                raise ValueError(f"{name}: config.json has no mask_id; a diffusion model needs one")
            x0 = windows[:, :-1]  # the same context windows as the AR models score
            L = x0.size(1)
            block_length = model.config.block_length if objective == "bd3lm" else 0
            if block_length and L % block_length:
                raise ValueError(f"{name} is a bd3lm model with blocks of {block_length} tokens: the window "
                                 f"length {L} must be a multiple of it (set --block_size)")
            estimators = ([None] if cfg.continuous else []) + sorted(cfg.steps)
            per = {T: diffusion_window_nelbo(model, x0, schedule, mask_id, T, cfg.samples_per_window, cfg.seed,
                                             t_min, objective, block_length) for T in estimators}
            bounds = []
            for T in estimators:
                m, se = mean_and_stderr(per[T])
                row = {"steps": "inf" if T is None else T, "nelbo": m, "nelbo_stderr": se,
                       "ppl_bound": math.exp(m), "ppl_bound_stderr": math.exp(m) * se}
                if T is not None and None in per:  # paired difference to the continuous bound
                    d_m, d_se = mean_and_stderr(per[T] - per[None])
                    row.update({"gap_to_continuous": d_m, "gap_stderr": d_se})
                bounds.append(row)
                gap = f"   L_T - L_inf = {row['gap_to_continuous']:+.4f} ± {row['gap_stderr']:.4f}" \
                    if "gap_to_continuous" in row else ""
                log(f"[{name}] {split}: T={row['steps']:>5}  NELBO {m:.4f} ± {se:.4f}  "
                    f"PPL <= {math.exp(m):.3f}{gap}")
            entry = {"bounds": bounds, "windows": len(windows), "tokens": len(windows) * L,
                     "samples_per_window": cfg.samples_per_window, "schedule": schedule.name}
            log(f"[{name}] {split}: {len(estimators)} estimators x {len(windows)} windows x "
                f"{cfg.samples_per_window} samples in {time.time() - t0:.1f}s")
        res["block_size"] = windows.size(1) - 1
        res["splits"][split] = entry
    return res


def evaluate(cfg: EvalConfig, log=print) -> dict:
    """Load every model, check it against the data, score it; write and log the results if cfg.out_dir."""
    cfg.validate()
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    meta = load_meta(cfg.data_dir)
    sources = [(m, False) for m in cfg.model] + ([(cfg.init_from, True)] if cfg.init_from else [])
    loaded = []
    for src, from_hf in sources:
        m = loading.load_model(init_from=src, device=device) if from_hf else loading.load_model(ckpt=src, device=device)
        name = m.info.get("name") or (src if from_hf else Path(src).resolve().name
                                      if Path(src).name != "export" else Path(src).resolve().parent.name)
        check_tokenizer_matches(m, meta, name, cfg.data_dir)
        loaded.append((name, m.model, m.info))
    # one window length for every model, so AR and diffusion numbers are per token of the same text
    length = cfg.block_size or min(m.config.block_size for _, m, _ in loaded)
    too_long = [n for n, m, _ in loaded if m.config.block_size < length]
    if too_long:
        raise ValueError(f"--block_size {length} exceeds the context of {too_long}")
    windows = {s: split_windows(read_split(cfg.data_dir, s, meta), length + 1, cfg.max_windows, s) for s in cfg.splits}
    results = {"config": asdict(cfg), "data": str(cfg.data_dir), "tokenizer": meta.get("tokenizer"),
               "device": device, "torch": torch.__version__, "models": []}
    t0 = time.time()
    for name, model, info in loaded:
        results["models"].append(evaluate_model(model, info, name, windows, cfg, log))
    results["seconds"] = time.time() - t0
    if cfg.out_dir:
        write_results(results, cfg.out_dir)
        if cfg.tensorboard:
            log_tensorboard(results, Path(cfg.out_dir) / "tb")
        if resolve_wandb_mode(cfg.wandb_mode) != "disabled":
            log_wandb(results, cfg)
        log(f"wrote {Path(cfg.out_dir) / 'results.json'}, results.md, bound_vs_steps.png")
    return results


# ----------------------------------------------------------------------------- reporting
def markdown_table(results: dict, split: str = "val") -> str:
    """One row per model and estimator: what the README shows."""
    lines = ["| model | objective | estimator | NELBO / loss (nats/token) | ± s.e. | L_T − L_∞ (paired s.e.) "
             "| PPL (bound for MDLM) |",
             "|---|---|---|---|---|---|---|"]
    for m in results["models"]:
        e = m["splits"].get(split)
        if e is None:
            continue
        if m["objective"] == "ar":
            lines.append(f"| {m['name']} | AR | exact | {e['loss']:.4f} | {e['loss_stderr']:.4f} | | "
                         f"{e['ppl']:.3f} |")
            continue
        for b in e["bounds"]:
            est = "continuous (T=∞)" if b["steps"] == "inf" else f"T = {b['steps']}"
            gap = f"{b['gap_to_continuous']:+.4f} ({b['gap_stderr']:.4f})" if "gap_to_continuous" in b else ""
            lines.append(f"| {m['name']} | MDLM | {est} | {b['nelbo']:.4f} | {b['nelbo_stderr']:.4f} | {gap} | "
                         f"≤ {b['ppl_bound']:.3f} |")
    return "\n".join(lines) + "\n"


def plot_bounds(results: dict, path, split: str = "val") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    all_T = [b["steps"] for m in results["models"] if m["objective"] != "ar"
             for b in m["splits"].get(split, {}).get("bounds", []) if b["steps"] != "inf"]
    x_lo, x_hi = (min(all_T) / 1.5, max(all_T) * 1.5) if all_T else (1, 10)
    for i, m in enumerate(results["models"]):
        e = m["splits"].get(split)
        if e is None:
            continue
        c = colors[i % len(colors)]
        if m["objective"] == "ar":
            ax.axhline(e["ppl"], color=c, linestyle=":", label=f"{m['name']} (AR): exact PPL {e['ppl']:.2f}")
            continue
        disc = [b for b in e["bounds"] if b["steps"] != "inf"]
        if disc:
            ax.errorbar([b["steps"] for b in disc], [b["ppl_bound"] for b in disc],
                        yerr=[2 * b["ppl_bound_stderr"] for b in disc], marker="o", color=c, capsize=3,
                        label=f"{m['name']} (MDLM): T-step bound")
        cont = [b for b in e["bounds"] if b["steps"] == "inf"]
        if cont:
            b = cont[0]
            ax.axhline(b["ppl_bound"], color=c, linestyle="--", label=f"continuous bound {b['ppl_bound']:.2f}")
            ax.axhspan(b["ppl_bound"] - 2 * b["ppl_bound_stderr"], b["ppl_bound"] + 2 * b["ppl_bound_stderr"],
                       color=c, alpha=0.12)
    ax.set_xscale("log", base=2)
    ax.set_xlim(x_lo, x_hi)
    if all_T:
        ticks = sorted(set(all_T))
        ax.set_xticks(ticks, [str(T) for T in ticks])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("diffusion timesteps T")
    ax.set_ylabel(f"{split} perplexity (upper bound for MDLM)")
    ax.set_title(f"PPL bound vs number of timesteps ({results.get('tokenizer')} tokens; error bars ±2 s.e.)",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_results(results: dict, out) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    md = "".join(f"### {split}\n\n{markdown_table(results, split)}\n" for split in results["config"]["splits"])
    (out / "results.md").write_text(md)
    plot_bounds(results, out / "bound_vs_steps.png", "val" if "val" in results["config"]["splits"]
                else results["config"]["splits"][0])


def scalar_metrics(results: dict):
    """(tag, value, step) triples: what tensorboard and wandb receive. The T-step bounds use step = T."""
    for m in results["models"]:
        for split, e in m["splits"].items():
            if m["objective"] == "ar":
                yield f"{m['name']}/{split}/loss", e["loss"], 0
                yield f"{m['name']}/{split}/ppl", e["ppl"], 0
                continue
            for b in e["bounds"]:
                if b["steps"] == "inf":
                    yield f"{m['name']}/{split}/nelbo_continuous", b["nelbo"], 0
                    yield f"{m['name']}/{split}/ppl_bound_continuous", b["ppl_bound"], 0
                else:
                    yield f"{m['name']}/{split}/nelbo_vs_T", b["nelbo"], b["steps"]
                    yield f"{m['name']}/{split}/ppl_bound_vs_T", b["ppl_bound"], b["steps"]


def log_tensorboard(results: dict, logdir) -> None:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception as e:  # tensorboard is optional at runtime
        print(f"warning: tensorboard logging skipped ({e})", file=sys.stderr)
        return
    w = SummaryWriter(str(logdir))
    for tag, value, step in scalar_metrics(results):
        w.add_scalar(tag, value, step)
    w.add_text("results", markdown_table(results))
    png = Path(logdir).parent / "bound_vs_steps.png"
    if png.is_file():
        import matplotlib.image as mpimg
        img = mpimg.imread(str(png))[..., :3]  # (H, W, 3) floats in [0, 1]
        w.add_image("bound_vs_steps", img, dataformats="HWC")
    w.close()


def log_wandb(results: dict, cfg: EvalConfig) -> None:
    try:
        import wandb
        run = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or None, dir=str(cfg.out_dir),
                         mode=resolve_wandb_mode(cfg.wandb_mode),
                         config=results["config"], job_type="eval", reinit="finish_previous",
                         settings=wandb.Settings(init_timeout=60, silent=True))
        for tag, value, step in scalar_metrics(results):
            run.log({tag: value, "T": step})
        table = wandb.Table(columns=["model", "split", "estimator", "nats_per_token", "stderr", "ppl"])
        for m in results["models"]:
            for split, e in m["splits"].items():
                if m["objective"] == "ar":
                    table.add_data(m["name"], split, "ar", e["loss"], e["loss_stderr"], e["ppl"])
                else:
                    for b in e["bounds"]:
                        table.add_data(m["name"], split, f"T={b['steps']}", b["nelbo"], b["nelbo_stderr"],
                                       b["ppl_bound"])
        png = Path(cfg.out_dir) / "bound_vs_steps.png"
        run.log({"results": table, **({"bound_vs_steps": wandb.Image(str(png))} if png.is_file() else {})})
        run.finish()
    except Exception as e:  # logging must never cost the results
        print(f"warning: wandb logging failed ({type(e).__name__}: {e}); results are in {cfg.out_dir}", file=sys.stderr)


def main(argv=None) -> dict:
    try:
        cfg = load_config(argv)
        return evaluate(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except OSError as e:  # transformers: hub weights neither cached nor downloadable
        print(f"error: could not load {cfg.init_from!r} ({e}). Without network, point --init_from at a local "
              f"GPT2LMHeadModel.save_pretrained directory, or fill the Hugging Face cache first.", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
