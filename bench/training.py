"""Training throughput: the DeepSpeed engine (ZeRO-0/2/3, one rank, in-process) against a plain PyTorch
loop, with the same model, batch, optimizer (torch AdamW over GPT.optimizer_param_groups), clipping and
LR schedule.

    python -m bench.training                                   # the quickstart model and batch
    python -m bench.training --config training/configs/shakespeare_ar.json --steps 30 --rounds 3
    python -m bench.training --model.n_layer=8 --batch_size 16  # any training-config override
    # pretrain.py against nanoGPT's own train.py (a checkout), same data and model, interleaved
    python -m bench.training --vs_nanogpt /path/to/nanoGPT --steps 50 --warmup 10 --rounds 3
    # GPT-2 124M on one GPU, bf16, compiled, Triton vs PyTorch attention (what bench/gpu_check.sh runs)
    python -m bench.training --config training/configs/train_gpt2.json --data_dir data/shakespeare --from_data \
        --dtype=bf16 --compile --stages 0,2 --attn_impls auto,torch --no_plain --steps 60

Batches are random token ids (no dataset needed), or with --from_data windows of the config's data_dir as
training samples them. The variants are timed in interleaved rounds (plain, ZeRO-0, ZeRO-2, ZeRO-3, plain,
...; each once per --attn_impls) and each one's best round is reported, so load from other processes on
the machine hits every variant alike. Prints tokens/s, MFU and the ratio to the first variant (the plain
loop, unless --no_plain).
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

if __package__ in (None, ""):  # run as a script: find the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import exit_on_config_error, knob, load, usage, wants_help
from common.host_memory import keep_freed_memory
from training.distributed import prepare_environment
from training.engines.interface import TrainingModule, compile_blocks

prepare_environment()
keep_freed_memory()  # as pretrain.py does (common/host_memory.py)

import torch  # noqa: E402

from models.gpt import GPT  # noqa: E402
from training.config import config_help, load_config  # noqa: E402
from training.engines.deepspeed_engine import DeepSpeedEngine  # noqa: E402
from training.engines.ds_config import load_ds_json, resolve  # noqa: E402
from training.metrics import default_peak_flops, model_flops_utilization  # noqa: E402
from training.optim import warmup_cosine_lr  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STAGES = (0, 2, 3)


class PlainLoop:
    """What DeepSpeed replaces: forward, backward, clip, AdamW step, LR schedule, zero_grad."""

    def __init__(self, module: TrainingModule, opt: dict, sched: dict, grad_clip: float):
        self.module = module
        self.opt = torch.optim.AdamW(module.gpt.optimizer_param_groups(opt["weight_decay"]), lr=opt["lr"],
                                     betas=tuple(opt["betas"]), eps=opt["eps"],
                                     **({"fused": True} if torch.cuda.is_available() else {}))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: warmup_cosine_lr(s, **sched) / sched["lr"])
        self.grad_clip = grad_clip
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        module.to(self.device)

    def train_step(self, x, y, seed):
        loss = self.module(x.to(self.device), y.to(self.device), seed)
        loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return loss


class DeepSpeedLoop:
    def __init__(self, engine: DeepSpeedEngine):
        self.engine = engine

    def train_step(self, x, y, seed):
        loss = self.engine.loss(x, y, seed)
        self.engine.backward(loss)
        self.engine.step()
        return loss


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@dataclass
class BenchConfig:
    """The bench's own keys; every other --key=value is a training-config override (as for pretrain.py)."""
    config: str = knob(str(REPO / "training/configs/shakespeare_mdlm.json"),
                       "training config whose model, objective, batch and optimizer are timed")
    vocab_size: int = knob(128, "embedding rows when the config says 0 (from data)")
    steps: int = knob(20, "timed optimizer steps per round")
    warmup: int = knob(3, "untimed steps first (and compile, with --compile)")
    rounds: int = knob(3, "interleaved rounds; the best round counts")
    json: str = knob("", "also write the results here")
    stages: list[int] = knob(list(STAGES), "ZeRO stages to time")
    plain: bool = knob(True, "time the plain PyTorch loop too (fp32, no autocast)")
    attn_impls: list[str] = knob([], "model.attn_impl values to time, each with every variant (empty: the config's)")
    from_data: bool = knob(False, "batches from the config's data_dir (train split) instead of random ids")
    vs_nanogpt: str = knob("", "a nanoGPT checkout: time training/pretrain.py against its train.py instead "
                               "(bench/vs_nanogpt.py)")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    prog = "python -m bench.training"
    if wants_help(argv):
        print(usage(BenchConfig, prog, __doc__, config_flag=None,
                    epilog="training config keys (override with --key=value):\n" + config_help()), end="")
        raise SystemExit(0)
    with exit_on_config_error(prog):
        # --config here is the training config file (a field of BenchConfig), not a file of bench keys
        args, _, overrides = load(BenchConfig, argv, config_flag=None, allow_unknown=True)
        if args.vs_nanogpt:  # its own model and runs: pretrain.py and nanoGPT's train.py as they are
            from bench import vs_nanogpt
            args.config_given = any(a == "--config" or a.startswith("--config=") for a in argv)
            return vs_nanogpt.main(args.vs_nanogpt, args, overrides)
        cfg, explicit = load_config(args.config, overrides)
    cfg.gradient_accumulation_steps = 1  # one micro step per optimizer step: the comparison is per step
    data = None
    if args.from_data:
        from training.data import TokenDataset
        data = TokenDataset(cfg.data_dir, "train")  # names the prepare command when it is missing
        if cfg.model.vocab_size == 0:
            cfg.model.vocab_size = data.meta["padded_vocab_size"]
        mask_id = data.meta["mask_id"]
    else:
        if cfg.model.vocab_size == 0:
            cfg.model.vocab_size = args.vocab_size
        mask_id = cfg.model.vocab_size - 1
    B, T = cfg.batch_size, cfg.model.block_size

    import deepspeed  # after prepare_environment()
    deepspeed.init_distributed()  # a world of one (prepare_environment set the rank variables)

    def fresh_module(attn_impl):
        torch.manual_seed(cfg.seed)  # identical weights for every variant
        gpt = GPT(replace(cfg.model, attn_impl=attn_impl))
        if cfg.compile:
            compile_blocks(gpt)
        return TrainingModule(gpt, cfg.objective, mask_id)

    variants = {}
    flops_per_token = GPT(cfg.model).flops_per_token(T)
    impls = args.attn_impls or [cfg.model.attn_impl]
    for impl in impls:
        suffix = f" attn={impl}" if len(impls) > 1 else ""
        base = None
        for stage in args.stages:
            ds_json = load_ds_json(REPO / f"ds_configs/zero{stage}.json")
            ds = resolve(ds_json, cfg, explicit - {"dtype"}, world_size=1, source=f"zero{stage}.json")
            base = base or ds
            engine = DeepSpeedEngine(fresh_module(impl), ds.config, ds.client_optimizer, ds.client_scheduler)
            variants[f"deepspeed zero{stage}{suffix}"] = DeepSpeedLoop(engine)
        if args.plain:
            base = base or resolve(load_ds_json(REPO / "ds_configs/zero0.json"), cfg, explicit - {"dtype"},
                                   world_size=1, source="zero0.json")
            plain = PlainLoop(fresh_module(impl), base.client_optimizer, base.client_scheduler, cfg.grad_clip)
            variants = {f"plain pytorch{suffix}": plain, **variants}
    if not variants:
        raise SystemExit(f"{prog}: nothing to time (--stages is empty and --no_plain)")
    if args.plain and cfg.dtype != "fp32":
        print(f"note: DeepSpeed runs {cfg.dtype}; the plain loop runs fp32 (no autocast) - compare with dtype=fp32")

    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, mask_id, (B, T + 1), generator=gen) for _ in range(4)]
    step_of = {name: 0 for name in variants}

    def batch(name):
        if data is not None:  # the loop's own sampling: (seed, step) -> windows
            return data.get_batch(B, T, seed=cfg.seed, step=step_of[name])
        w = batches[step_of[name] % len(batches)]
        return w[:, :-1], w[:, 1:]

    losses = {name: [] for name in variants}

    def run(name, n):
        loop = variants[name]
        for _ in range(n):
            x, y = batch(name)
            losses[name].append(loop.train_step(x, y, seed=step_of[name]).item())  # .item(): wait for the step
            step_of[name] += 1

    t_compile = {}
    for name in variants:
        t0 = time.perf_counter()
        run(name, args.warmup)
        t_compile[name] = time.perf_counter() - t0
    peak = cfg.peak_flops or default_peak_flops(cfg.dtype)
    device = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu, {torch.get_num_threads()} threads"
    best = {name: 0.0 for name in variants}

    def results(rounds_done: int) -> dict:
        first = next(iter(best))
        out = {}
        for name, tps in best.items():
            out[name] = {"tokens_per_s": tps, "mfu": model_flops_utilization(flops_per_token, tps, peak),
                         "ratio_to_first": tps / best[first] if best[first] else 0.0, "steps": step_of[name],
                         "last_loss": losses[name][-1], "warmup_s": t_compile[name]}
        if args.json:  # after every round: a run cut short keeps what it measured
            Path(args.json).write_text(json.dumps({"config": cfg.to_dict(), "peak_flops": peak, "device": device,
                                                   "first": first, "rounds_done": rounds_done, "results": out}, indent=2))
        return out

    final = results(0)
    for r in range(args.rounds):
        for name in variants:
            sync()
            t0 = time.perf_counter()
            run(name, args.steps)
            sync()
            best[name] = max(best[name], args.steps * B * T / (time.perf_counter() - t0))
        final = results(r + 1)

    print(f"model {cfg.model.n_layer}L/{cfg.model.n_head}H/{cfg.model.n_embd}d block {T}, batch {B}, "
          f"{cfg.objective.name}, {cfg.dtype}{', compiled' if cfg.compile else ''}, {device}, "
          f"{'data ' + cfg.data_dir if data is not None else 'random ids'}, "
          f"best of {args.rounds} rounds x {args.steps} steps")
    width = max(18, max(len(n) for n in best))
    print(f"{'variant':<{width}} {'tokens/s':>10} {'MFU':>7} {'vs first':>9} {'last loss':>9}")
    for name, v in final.items():
        print(f"{name:<{width}} {v['tokens_per_s']:>10,.0f} {v['mfu']:>7.2%} {v['ratio_to_first']:>8.3f}x "
              f"{v['last_loss']:>9.4f}")


if __name__ == "__main__":
    main()
