"""Pretrain a GPT (objective ar) or a masked-diffusion language model (objective mdlm, or bd3lm: block
diffusion with block-causal attention) with DeepSpeed (default) or FSDP2 (--engine=fsdp).

    # CPU, 2 ranks (DS_ACCELERATOR=cpu; OMP_NUM_THREADS=1 keeps 2 ranks off each other's cores)
    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 2 training/pretrain.py \\
        --config training/configs/shakespeare_mdlm.json --deepspeed_config ds_configs/zero2.json
    # every GPU of this machine / of every host in a hostfile
    deepspeed training/pretrain.py --config training/configs/shakespeare_mdlm.json
    deepspeed --hostfile hosts training/pretrain.py --config ... --deepspeed_config ds_configs/zero3.json
    # one process, no launcher (torchrun works too)
    python training/pretrain.py --config training/configs/tiny_test.json --max_iters=50
    # the FSDP2 engine (training/fsdp_engine.py): torchrun, no DeepSpeed JSON; gloo on CPU, nccl on GPUs
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 training/pretrain.py --config ... --engine=fsdp

Config: defaults (training/config.py) < --config FILE.json|.toml < --key=value / --key value flags
(nested keys with a dot: --model.n_layer=4, --objective.name=ar). The DeepSpeed JSON states the ZeRO
stage; batch, clipping, optimizer, LR schedule and precision are "auto" there and come from the training
config (training/ds_config.py); with --engine=fsdp everything comes from the training config, and
giving --deepspeed_config is an error. --resume continues from the latest verified checkpoint in out_dir.
SIGTERM: every rank finishes its step, a checkpoint is written, and the run exits cleanly.
"""
import argparse
import math
import signal
import sys
import time
from pathlib import Path

# the top-level folders are import roots, not installed packages: put the repository root on the path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.engine import TrainingModule, compile_blocks, make_engine, mix_seed, prepare_environment, rank_and_world
from training.shm_buffers import release_at_exit

prepare_environment()  # before DeepSpeed is imported: accelerator and single-process rank variables
release_at_exit()  # DeepSpeed's CPU all-reduce leaves a 66 MB /dev/shm file per rank behind otherwise

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from models.diffusion import is_diffusion  # noqa: E402
from models.gpt import GPT, GPTConfig  # noqa: E402
from models.tokenizer import tokenizer_from_meta  # noqa: E402
from training import checkpoint as ckpt  # noqa: E402
from training.config import config_help, load_config  # noqa: E402
from training.data import TokenDataset, check_compatible, load_meta  # noqa: E402
from training.ds_config import load_ds_json, resolve, zero_stage  # noqa: E402
from training.fsdp_engine import CONFIG_FILE as FSDP_CONFIG_FILE, is_fsdp_checkpoint, resolve_fsdp  # noqa: E402
from training.metrics import Metrics, default_peak_flops, memory_mb  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DS_CONFIG = REPO / "ds_configs" / "zero2.json"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="training/pretrain.py", description=__doc__, allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="training config keys (override with --key=value):\n" + config_help())
    parser.add_argument("--config", help="training config file (.json or .toml); flags override it")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    # --deepspeed, --deepspeed_config (default None: ds_configs/zero2.json for engine=deepspeed, an error for fsdp)
    parser = deepspeed.add_config_arguments(parser)
    args, overrides = parser.parse_known_args(argv)
    return args, overrides


class StopOnSigterm:
    """SIGTERM sets a flag; at every step boundary the ranks agree (all-reduce max) on whether to stop,
    so they all write the same checkpoint and leave together. Stopping mid-step would desync ZeRO."""

    def __init__(self):
        self.received = False
        signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        self.received = True

    def agreed(self) -> bool:
        flag = torch.tensor([1.0 if self.received else 0.0])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def all_mean(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


@torch.no_grad()
def evaluate(engine, val_data, cfg, rank, world) -> float:
    """Mean loss over the same eval batches every time (for mdlm/bd3lm: the continuous-time NELBO with a
    fixed seed per batch, so evaluations are comparable). Each rank runs its share; under ZeRO-3 every
    rank must run the same number of forwards, hence eval_iters rounded up to a multiple of world."""
    engine.eval()
    num_batches = math.ceil(cfg.eval_iters / world) * world
    total = 0.0
    for k, (x, y) in enumerate(val_data.val_batches(cfg.batch_size, cfg.model.block_size, num_batches, rank, world)):
        batch_index = rank + k * world
        total += engine.loss(x, y, seed=mix_seed(cfg.seed, 1, batch_index)).item()
    engine.train()
    return all_mean([total * world / num_batches])[0]


# model keys that may change when a run is resumed: they do not change the parameters
RESUMABLE_MODEL_KEYS = ("dropout", "attn_impl")


def check_same_architecture(saved: dict, cfg, tag_dir) -> None:
    """A resumed run must rebuild the checkpoint's network: a config file edited since (another
    pos_emb, width, objective, ...) would otherwise fail deep inside DeepSpeed's state-dict loading."""
    now = cfg.to_dict()
    then = GPTConfig.from_dict(saved["model"]).to_dict()  # keys added since the checkpoint: their defaults
    diffs = [(f"model.{k}", v, now["model"].get(k)) for k, v in then.items()
             if k not in RESUMABLE_MODEL_KEYS and now["model"].get(k) != v
             and not (k == "vocab_size" and now["model"].get(k) == 0)]  # 0 = "from the data"
    if saved["objective"]["name"] != now["objective"]["name"]:
        diffs.append(("objective.name", saved["objective"]["name"], now["objective"]["name"]))
    if diffs:
        what = "; ".join(f"{key}: checkpoint {old!r}, now {new!r}" for key, old, new in diffs)
        flags = " ".join(f"--{key}={old}" for key, old, _ in diffs)
        raise ValueError(f"--resume: the checkpoint {tag_dir} was trained with another network than the config "
                         f"now describes ({what}). Resume with the checkpoint's values ({flags}) or train "
                         f"into a new --out_dir.")


def check_same_world(saved_ds: dict, world: int, tag_dir) -> None:
    """ZeRO stages >= 1 shard the optimizer state over the ranks, and DeepSpeed cannot re-shard it."""
    per_rank = saved_ds["train_micro_batch_size_per_gpu"] * saved_ds["gradient_accumulation_steps"]
    saved_world = saved_ds["train_batch_size"] // per_rank
    if saved_world != world and saved_ds.get("zero_optimization", {}).get("stage", 0) >= 1:
        raise ValueError(f"--resume: the checkpoint {tag_dir} was written by {saved_world} rank(s) with ZeRO "
                         f"stage {saved_ds['zero_optimization']['stage']}, whose optimizer state is sharded per "
                         f"rank; this run has {world}. Resume with {saved_world} ranks (e.g. NPROC={saved_world} "
                         f"bash launch.sh --resume), or train into a new --out_dir.")


def setup_config(args, overrides, world):
    """Config, data meta and resolved DeepSpeed config; every mistake a user can make shows up here."""
    cfg, explicit = load_config(args.config, overrides)
    found = None
    if cfg.resume:
        found = ckpt.find_latest_good(cfg.out_dir)
        if found is None:
            raise FileNotFoundError(ckpt.no_checkpoint_message(cfg.out_dir))
        saved_cfg, saved_ds, _ = ckpt.load_side_files(ckpt.ckpt_root(cfg.out_dir) / found.tag)
        check_same_world(saved_ds, world, ckpt.ckpt_root(cfg.out_dir) / found.tag)
        # the saved, resolved config is the base; the file and flags given now still override it
        cfg, explicit = load_config(args.config, overrides, base=saved_cfg)
        check_same_architecture(saved_cfg, cfg, ckpt.ckpt_root(cfg.out_dir) / found.tag)
    meta = load_meta(cfg.data_dir)  # names the prepare command when the data is missing
    tokenizer = tokenizer_from_meta(meta)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = meta["padded_vocab_size"]
    check_compatible(meta, cfg.tokenizer or meta["tokenizer"], cfg.model.vocab_size, cfg.model.block_size)
    if found is not None:
        kind = "fsdp" if is_fsdp_checkpoint(ckpt.ckpt_root(cfg.out_dir) / found.tag) else "deepspeed"
        if kind != cfg.engine:
            raise ValueError(f"checkpoint {found.tag} in {cfg.out_dir} was written by engine={kind}; resume it with "
                             f"--engine={kind} (or export it and start a new run)")
    if cfg.engine == "fsdp":
        if args.deepspeed_config is not None:
            raise ValueError(f"--deepspeed_config={args.deepspeed_config} is for engine=deepspeed; engine=fsdp takes "
                             f"batch, optimizer, schedule, clipping and dtype from the training config: drop it")
        return cfg, found, meta, tokenizer, resolve_fsdp(cfg, world)
    ds_path = args.deepspeed_config or str(DEFAULT_DS_CONFIG)
    ds = resolve(load_ds_json(ds_path), cfg, explicit, world, source=ds_path)
    return cfg, found, meta, tokenizer, ds


def main(argv=None):
    args, overrides = parse_args(argv)
    rank, local_rank, world = rank_and_world()
    try:
        cfg, found, meta, tokenizer, ds = setup_config(args, overrides, world)
    except (ValueError, FileNotFoundError) as e:  # a config or data mistake: the message, not a traceback
        sys.exit(f"error: {e}")
    mask_id = meta["mask_id"]
    B, T, gas = cfg.batch_size, cfg.model.block_size, cfg.gradient_accumulation_steps
    tokens_per_step = B * T * gas * world

    # ---------------------------------------------------------------- model and engine
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (ZeRO-3 slices them locally)
    gpt = GPT(cfg.model)
    num_params, flops_per_token = gpt.num_params(), gpt.flops_per_token(T)  # before ZeRO-3 partitions them
    if cfg.compile:
        compile_blocks(gpt)
    engine = make_engine(cfg.engine, TrainingModule(gpt, cfg.objective, mask_id), ds)
    step, tokens_seen = 0, 0
    if found is not None:
        client = engine.load(str(ckpt.ckpt_root(cfg.out_dir)), found.tag)
        ckpt.restore_rng(ckpt.ckpt_root(cfg.out_dir) / found.tag, rank)
        step, tokens_seen = client["step"], client["tokens_seen"]

    train_data, val_data = TokenDataset(cfg.data_dir, "train"), TokenDataset(cfg.data_dir, "val")
    data_meta = {"tokenizer": tokenizer.to_meta(), "mask_id": mask_id, "eot_id": meta["eot_id"],
                 "data_dir": cfg.data_dir}
    peak_flops = cfg.peak_flops or default_peak_flops(cfg.dtype)
    metrics = Metrics(cfg.out_dir, rank, cfg, cfg.max_iters, step)
    fsdp = cfg.engine == "fsdp"
    metrics.log("config", step, train_config=cfg.to_dict(), **{"fsdp_config" if fsdp else "ds_config": ds.config},
                engine=cfg.engine, world_size=world, zero_stage=None if fsdp else zero_stage(ds.config),
                num_params=num_params, peak_flops=peak_flops, data=meta["data_dir"], tokenizer=meta["tokenizer"])
    sharding = "FSDP2" if fsdp else f"ZeRO-{zero_stage(ds.config)}"
    metrics.print(f"{cfg.objective.name} model, {num_params / 1e6:.2f}M params, {sharding}, "
                  f"{world} rank(s) on {engine.device}, {cfg.dtype}, {tokens_per_step:,} tokens/step "
                  f"(batch {B} x block {T} x accum {gas} x {world} ranks)")
    for note in found.skipped if found else []:
        metrics.print(f"WARNING: skipped checkpoint {note}")
    if found is not None:
        metrics.print(f"resumed from {ckpt.ckpt_root(cfg.out_dir) / found.tag} (step {step})")
        metrics.log("resumed", step, checkpoint=found.tag, skipped=found.skipped)

    def run_eval():
        val = evaluate(engine, val_data, cfg, rank, world)
        bound = is_diffusion(cfg.objective.name)
        metrics.log("eval", step, val_loss=val, val_ppl=math.exp(val), val_ppl_is_bound=bound, tokens_seen=tokens_seen)
        what = "val NELBO" if bound else "val loss"
        metrics.print(f"step {step}: {what} {val:.4f} nats/token, PPL {'<= ' if bound else ''}{math.exp(val):.2f}")
        return val

    def save():
        tag = ckpt.tag_for(step)
        root = ckpt.ckpt_root(cfg.out_dir)
        ckpt.write_side_files(root / tag, rank, cfg.to_dict(), ds.config, data_meta,
                              engine_config_name=FSDP_CONFIG_FILE if cfg.engine == "fsdp" else ckpt.DS_CONFIG)
        engine.save(str(root), tag, {"step": step, "tokens_seen": tokens_seen})
        dist.barrier()  # every rank's shards are on disk before rank 0 hashes them
        if rank == 0:
            ckpt.finalize(root, tag, step, cfg.keep_checkpoints)
        dist.barrier()
        return tag

    if cfg.eval_only:
        run_eval()
        metrics.close()
        return

    # ---------------------------------------------------------------- the loop
    stop = StopOnSigterm()
    start_step, last_tag, stopped = step, None, False
    loss_sum, window_steps, window_t0 = torch.zeros(()), 0, time.perf_counter()
    engine.train()
    while step < cfg.max_iters:
        if step % cfg.eval_interval == 0 and not (found is not None and step == start_step):
            run_eval()
            window_t0 = time.perf_counter()  # tokens/s counts training time only
        lr = engine.lr
        for micro_step in range(gas):
            x, y = train_data.get_batch(B, T, seed=cfg.seed, step=step, rank=rank, micro_step=micro_step)
            loss = engine.loss(x, y, seed=mix_seed(cfg.seed, 0, step, rank, micro_step))
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach().float().cpu() / gas  # no .item(): a GPU keeps running ahead
        step += 1
        tokens_seen += tokens_per_step
        window_steps += 1

        if step % cfg.log_interval == 0 or step == cfg.max_iters:
            dt = time.perf_counter() - window_t0
            (mean_loss,) = all_mean([loss_sum.item() / window_steps])  # the loss of the global batch
            tokens_per_s = window_steps * tokens_per_step / dt
            mfu = flops_per_token * tokens_per_s / world / peak_flops  # per rank, as peak_flops is
            metrics.log("train", step, loss=mean_loss, lr=lr, grad_norm=engine.grad_norm,
                        tokens_per_s=tokens_per_s, mfu=mfu, mem_mb=memory_mb(), tokens_seen=tokens_seen)
            metrics.advance(window_steps, loss=f"{mean_loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", mfu=f"{mfu:.1%}")
            loss_sum, window_steps, window_t0 = torch.zeros(()), 0, time.perf_counter()

        stopped = stop.agreed()
        if stopped or step == cfg.max_iters or (cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0):
            last_tag = save()
            window_t0 = time.perf_counter()
        if stopped:
            metrics.print(f"SIGTERM: checkpoint {last_tag} written at step {step}; exiting")
            metrics.log("stopped", step, reason="SIGTERM", checkpoint=last_tag, tokens_seen=tokens_seen)
            break

    if not stopped:
        if step > start_step or found is None:
            run_eval()
        last_tag = last_tag or (found.tag if found else save())
        export_dir = None
        if cfg.export_dir != "none":
            export_dir = cfg.export_dir or str(Path(cfg.out_dir) / "export")
            if rank == 0:
                from training.export import export_checkpoint
                export_checkpoint(ckpt.ckpt_root(cfg.out_dir) / last_tag, export_dir)
                metrics.print(f"exported {last_tag} -> {export_dir}")
            dist.barrier()
        metrics.log("done", step, tokens_seen=tokens_seen, checkpoint=last_tag, export=export_dir)
    metrics.close()


if __name__ == "__main__":
    try:
        main()
    finally:
        # leave the process group explicitly: tearing it down in interpreter shutdown has been seen to
        # abort with "terminate called without an active exception"
        if dist.is_initialized():
            dist.destroy_process_group()
