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
    # the FSDP2 engine (training/engines/fsdp_engine.py): torchrun, no DeepSpeed JSON; gloo on CPU, nccl on GPUs
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 training/pretrain.py --config ... --engine=fsdp

Config: defaults (training/config.py) < --config FILE.json|.toml < --key=value / --key value flags
(nested keys with a dot: --model.n_layer=4, --objective.name=ar). The DeepSpeed JSON states the ZeRO
stage; batch, clipping, optimizer, LR schedule and precision are "auto" there and come from the training
config (training/engines/ds_config.py); with --engine=fsdp everything comes from the training config, and
giving --deepspeed_config is an error. --resume continues from the latest verified checkpoint in out_dir;
without it, an out_dir that holds an earlier run is refused (--overwrite removes that run first).
SIGTERM: every rank finishes its step, a checkpoint is written, and the run exits cleanly.
"""
import argparse
import math
import sys
import time
from pathlib import Path

# the top-level folders are import roots, not installed packages: put the repository root on the path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.distributed import StopOnSigterm, all_mean, barrier, mix_seed, prepare_environment, rank_and_world
from training.shm_buffers import release_at_exit, remove_stale_buffers
from common.host_memory import keep_freed_memory


def prepare_process() -> None:
    """What a training process sets up before DeepSpeed is imported. Only when this file runs as the
    program (python, deepspeed, torchrun all run it as __main__): importing it (the tests call cli()
    in-process for the refusals a user meets before anything trains) leaves os.environ and the process alone."""
    prepare_environment()  # accelerator and single-process rank variables
    release_at_exit()  # DeepSpeed's CPU all-reduce leaves a 66 MB /dev/shm file per rank behind otherwise
    keep_freed_memory()  # reuse freed activations instead of re-mapping them every step (common/host_memory.py)
    if rank_and_world()[1] == 0:  # one rank per node: the buffers SIGKILLed runs left behind
        remove_stale_buffers(log=lambda msg: print(msg, file=sys.stderr, flush=True))


if __name__ == "__main__":
    prepare_process()

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from models.diffusion import is_diffusion  # noqa: E402
from models.gpt import GPT  # noqa: E402
from models.tokenizer import tokenizer_from_meta  # noqa: E402
from training.checkpointing import layout as ckpt  # noqa: E402
from training.checkpointing.checkpointer import Checkpointer, ResumePoint  # noqa: E402
from training.config import config_help, load_config  # noqa: E402
from training.data import CorruptData, TokenDataset, check_compatible, load_meta, verify_dataset  # noqa: E402
from training.distillation import check_distillation, training_module  # noqa: E402
from training.engines.ds_config import load_ds_json, resolve, zero_stage  # noqa: E402
from training.engines.interface import compile_blocks, init_process_group, make_engine  # noqa: E402
from training.engines.fsdp_engine import CONFIG_FILE as FSDP_CONFIG_FILE, resolve_fsdp  # noqa: E402
from training.hostfile import launch_info, single_node_warning  # noqa: E402
from training.init_from import load_weights, source_for_run  # noqa: E402
from training.run_lock import OutDirInUse, claim_out_dir, lock_out_dir  # noqa: E402
from common.disk import DiskFull, disk_full_error, is_disk_full  # noqa: E402
from training.metrics import LossWindow, Metrics, default_peak_flops, memory_mb, model_flops_utilization, provenance  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DS_CONFIG = REPO / "ds_configs" / "zero2.json"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="training/pretrain.py", description=__doc__, allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="training config keys (override with --key=value):\n" + config_help())
    parser.add_argument("--config", help="training config file (.json or .toml); flags override it")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    # a command-line flag only, never a config key: a config file that says so would discard a run on every rerun
    parser.add_argument("--overwrite", action="store_true",
                        help="out_dir holds an earlier run: remove its checkpoints, export and metrics, then "
                             "start anew")
    # --deepspeed, --deepspeed_config (default None: ds_configs/zero2.json for engine=deepspeed, an error for fsdp)
    parser = deepspeed.add_config_arguments(parser)
    args, overrides = parser.parse_known_args(argv)
    return args, overrides


def setup_config(args, overrides, world):
    """Config, resume point, init source, data meta, tokenizer and the engine's resolved config; every
    mistake a user can make shows up here."""
    cfg, explicit = load_config(args.config, overrides)
    for note in lock_out_dir(cfg.out_dir):  # one run per out_dir: a second one stops here, naming the first
        print(f"WARNING: {note}", file=sys.stderr, flush=True)
    resume = None
    if cfg.resume:
        if world > 1:  # rank 0 verifies the checkpoint and tells the others (ResumePoint.find): a group first
            init_process_group(ckpt.checkpoint_kind(cfg.out_dir) or cfg.engine)
        resume = ResumePoint.find(cfg.out_dir)
        # the saved, resolved config is the base; the file and flags given now still override it
        cfg, explicit = load_config(args.config, overrides, base=resume.train_config)
        resume.check_compatible(cfg, world)  # the same network and engine
        resume.keep_global_batch(cfg, world, accumulation_flag=any(
            o.startswith("--gradient_accumulation_steps") for o in overrides))  # on another number of ranks
    meta = load_meta(cfg.data_dir)  # names the prepare command when the data is missing
    if cfg.verify_data:
        verify_dataset(meta)  # sha256 and every id, against meta.json
    tokenizer = tokenizer_from_meta(meta)
    if resume:
        resume.check_same_data(tokenizer.to_meta(), cfg.data_dir)  # the same token ids
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = meta["padded_vocab_size"]
    if cfg.distill_from:  # the teacher: an mdlm model of these token ids; fills in the rounds
        check_distillation(cfg, tokenizer.to_meta(), explicit)
    source = None
    if cfg.init_from and not resume:  # a resumed run has the weights already (and the shape in its config)
        source = source_for_run(cfg.init_from, cfg.model, explicit, tokenizer.to_meta(), cfg.data_dir)
        cfg.__post_init__()  # the adopted shape against the objective (and GPTConfig's own checks)
        cfg.model.__post_init__()
    check_compatible(meta, cfg.tokenizer or meta["tokenizer"], cfg.model.vocab_size, cfg.model.block_size)
    if cfg.engine == "fsdp":
        if args.deepspeed_config is not None:
            raise ValueError(f"--deepspeed_config={args.deepspeed_config} is for engine=deepspeed; engine=fsdp takes "
                             f"batch, optimizer, schedule, clipping and dtype from the training config: drop it")
        return cfg, resume, source, meta, tokenizer, resolve_fsdp(cfg, world)
    ds_path = args.deepspeed_config or str(DEFAULT_DS_CONFIG)
    resolved = resolve(load_ds_json(ds_path), cfg, explicit, world, source=ds_path)
    if resume:  # another world size or ZeRO stage: through a universal checkpoint (FSDP's DCP reshards itself)
        resume.plan_resharding(resolved.config, world)
    return cfg, resume, source, meta, tokenizer, resolved


class Validator:
    """The held-out loss every eval_interval steps, over the same batches every time (for mdlm/bd3lm: the
    continuous-time NELBO with a fixed seed per batch), so evaluations are comparable. Each rank runs its
    share; under ZeRO-3 every rank must run the same number of forwards, hence eval_iters rounded up to a
    multiple of world."""

    def __init__(self, cfg, rank: int, world: int, metrics: Metrics):
        self.cfg, self.rank, self.world, self.metrics = cfg, rank, world, metrics
        self.data = TokenDataset(cfg.data_dir, "val")
        self.is_bound = is_diffusion(cfg.objective.name)  # a diffusion loss bounds the NLL from above

    def should_validate(self, step: int) -> bool:
        return step % self.cfg.eval_interval == 0

    @torch.no_grad()
    def validate(self, engine, step: int, tokens_seen: int) -> float:
        cfg, rank, world = self.cfg, self.rank, self.world
        engine.eval()
        num_batches = math.ceil(cfg.eval_iters / world) * world
        total = 0.0
        for k, (x, y) in enumerate(self.data.val_batches(cfg.batch_size, cfg.model.block_size, num_batches, rank, world)):
            batch_index = rank + k * world
            total += engine.loss(x, y, seed=mix_seed(cfg.seed, 1, batch_index)).item()
        engine.train()
        val = all_mean([total * world / num_batches])[0]
        self.metrics.log("eval", step, val_loss=val, val_ppl=math.exp(val), val_ppl_is_bound=self.is_bound,
                         tokens_seen=tokens_seen)
        what = "val NELBO" if self.is_bound else "val loss"
        self.metrics.print(f"step {step}: {what} {val:.4f} nats/token, PPL {'<= ' if self.is_bound else ''}{math.exp(val):.2f}")
        return val


def export_final(cfg, tag_dir: Path, rank: int, metrics: Metrics) -> str | None:
    """Consolidate the last checkpoint into cfg.export_dir (default OUT/export; "none": skip)."""
    if cfg.export_dir == "none":
        return None
    export_dir = cfg.export_dir or str(Path(cfg.out_dir) / "export")
    if rank == 0:
        from training.export import export_checkpoint
        try:
            export_checkpoint(tag_dir, export_dir)
        except Exception as e:
            if is_disk_full(e, export_dir):
                raise disk_full_error(export_dir, "the export", keeps=f"The checkpoint {tag_dir.name} is complete; "
                                      f"export it later with python -m training.export --ckpt {cfg.out_dir} "
                                      f"--out {export_dir}.") from e
            raise
        metrics.print(f"exported {tag_dir.name} -> {export_dir}")
    barrier()
    return export_dir


def main(argv=None):
    args, overrides = parse_args(argv)
    rank, _, world = rank_and_world()
    try:
        cfg, resume, source, meta, tokenizer, resolved = setup_config(args, overrides, world)
        # last, once every check has passed: a new run never lands on an earlier one unless told to replace it
        claim_out_dir(cfg.out_dir, cfg.resume, args.overwrite, rank, log=lambda msg: print(msg, flush=True))
    except (ValueError, FileNotFoundError, OutDirInUse) as e:  # a config or data mistake: the message, not a traceback
        sys.exit(f"error: {e}")
    B, T, gas = cfg.batch_size, cfg.model.block_size, cfg.gradient_accumulation_steps
    tokens_per_step = B * T * gas * world
    fsdp = cfg.engine == "fsdp"

    # ---------------------------------------------------------------- model, engine, checkpoints
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (ZeRO-3 slices them locally)
    gpt = GPT(cfg.model)
    if source is not None:
        load_weights(gpt, source)  # before the engine: ZeRO-3 partitions what is loaded here
    num_params, flops_per_token = gpt.num_params(), gpt.flops_per_token(T)  # before ZeRO-3 partitions them
    if cfg.compile:
        compile_blocks(gpt)
    module, distillation = training_module(cfg, gpt, meta["mask_id"], rank)  # the objective, or a teacher's steps
    engine = make_engine(cfg.engine, module, resolved)
    data_meta = {"tokenizer": tokenizer.to_meta(), "mask_id": meta["mask_id"], "eot_id": meta["eot_id"],
                 "data_dir": cfg.data_dir}
    checkpointer = Checkpointer(cfg.out_dir, rank, cfg.checkpoint_interval, cfg.keep_checkpoints,
                                train_config=cfg.to_dict(), engine_config=resolved.config, data_meta=data_meta,
                                engine_config_name=FSDP_CONFIG_FILE if fsdp else ckpt.DS_CONFIG)
    step, tokens_seen = checkpointer.load(engine, resume) if resume else (0, 0)

    # ---------------------------------------------------------------- data and logging
    train_data = TokenDataset(cfg.data_dir, "train")
    peak_flops = cfg.peak_flops or default_peak_flops(cfg.dtype)
    metrics = Metrics(cfg.out_dir, rank, cfg, cfg.max_iters, step)
    metrics.log("config", step, train_config=cfg.to_dict(), **{"fsdp_config" if fsdp else "ds_config": resolved.config},
                engine=cfg.engine, world_size=world, zero_stage=None if fsdp else zero_stage(resolved.config),
                num_params=num_params, peak_flops=peak_flops, data=meta["data_dir"], tokenizer=meta["tokenizer"],
                init_from=source.record() if source else None,
                **(provenance(REPO) if rank == 0 else {}))  # git commit and library versions
    sharding = "FSDP2" if fsdp else f"ZeRO-{zero_stage(resolved.config)}"
    metrics.print(f"{cfg.objective.name} model, {num_params / 1e6:.2f}M params, {sharding}, "
                  f"{world} rank(s) on {engine.device}, {cfg.dtype}, {tokens_per_step:,} tokens/step "
                  f"(batch {B} x block {T} x accum {gas} x {world} ranks)")
    if source is not None:
        metrics.print(f"initialised from {source.describe()}; optimizer and schedule start fresh")
        for note in source.notes:
            metrics.print(f"init_from: {note}")
    launch = launch_info()  # a hostfile was given, yet only this node joined: say so before any step runs
    if launch.nodes > 1:
        metrics.print(f"{launch.nodes} nodes joined ({world} ranks)")
    elif warning := single_node_warning(launch):
        metrics.print(warning)
    if resume:
        for note in resume.skipped:
            metrics.print(f"WARNING: skipped checkpoint {note}")
        for note in resume.notes:
            metrics.print(f"resume: {note}")
        metrics.print(f"resumed from {resume.tag_dir} (step {step})")
        metrics.log("resumed", step, checkpoint=resume.tag, skipped=resume.skipped, universal=resume.universal,
                    notes=resume.notes)
    validator = Validator(cfg, rank, world, metrics)
    if cfg.eval_only:
        validator.validate(engine, step, tokens_seen)
        metrics.close()
        return

    # ---------------------------------------------------------------- the loop
    stop = StopOnSigterm()
    start_step, stopped = step, False
    losses, window_t0 = LossWindow(), time.perf_counter()
    engine.train()
    while step < cfg.max_iters:
        if validator.should_validate(step) and not (resume and step == start_step):  # its writer evaluated it
            validator.validate(engine, step, tokens_seen)
            window_t0 = time.perf_counter()  # tokens/s counts training time only
        if distillation is not None:  # each round's student is the next round's teacher
            distillation.begin_step(step, engine, checkpointer, metrics, tokens_seen)
        lr = engine.lr
        # attention annealing (DiffuGPT): from causal (0) to the model's own mask (1) over the first N steps
        future = min(1.0, step / cfg.anneal_attention_iters) if cfg.anneal_attention_iters else 1.0
        for micro_step in range(gas):
            # a micro batch is named by its place in the global batch, not by (rank, micro step): 2 ranks x
            # accumulation 1 and 1 rank x accumulation 2 train on the same batches and masks (resume elsewhere)
            part = rank * gas + micro_step
            x, y = train_data.get_batch(B, T, seed=cfg.seed, step=step, part=part)
            loss = engine.loss(x, y, seed=mix_seed(cfg.seed, 0, step, part, 0), future_attention=future)
            engine.backward(loss)
            engine.step()
            losses.add(loss, gas)  # on the device: no wait for the GPU per micro step
        step += 1
        tokens_seen += tokens_per_step
        losses.end_step()

        if step % cfg.log_interval == 0 or step == cfg.max_iters:
            dt = time.perf_counter() - window_t0
            window_steps = losses.steps
            (mean_loss,) = all_mean([losses.read()])  # the loss of the global batch
            tokens_per_s = window_steps * tokens_per_step / dt
            mfu = model_flops_utilization(flops_per_token, tokens_per_s, peak_flops, ranks=world)
            metrics.log("train", step, loss=mean_loss, lr=lr, grad_norm=engine.grad_norm,
                        tokens_per_s=tokens_per_s, mfu=mfu, mem_mb=memory_mb(), tokens_seen=tokens_seen,
                        **({"future_attention": future} if cfg.anneal_attention_iters else {}))
            metrics.advance(window_steps, loss=f"{mean_loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", mfu=f"{mfu:.1%}")
            window_t0 = time.perf_counter()

        stopped = stop.agreed()
        if checkpointer.should_save(step, stopping=stopped, last=step == cfg.max_iters):
            checkpointer.save(engine, step, tokens_seen)
            window_t0 = time.perf_counter()
        if stopped:
            metrics.print(f"{stop.reason}: checkpoint {checkpointer.last_tag} written at step {step}; exiting")
            metrics.log("stopped", step, reason=stop.reason, checkpoint=checkpointer.last_tag, tokens_seen=tokens_seen)
            break

    if not stopped:
        if step > start_step or not resume:
            validator.validate(engine, step, tokens_seen)
        last_tag = checkpointer.last_tag or checkpointer.save(engine, step, tokens_seen)  # a run of 0 steps
        export_dir = export_final(cfg, checkpointer.root / last_tag, rank, metrics)
        metrics.log("done", step, tokens_seen=tokens_seen, checkpoint=last_tag, export=export_dir)
    metrics.close()


def cli(argv=None):
    """The command: main(), with the faults a user can act on said in one line (exit 1), no traceback."""
    try:
        main(argv)
    except (DiskFull, CorruptData) as e:  # the path, the free space and what is still good; not a C++ stream error
        sys.exit(f"error: {e}")
    finally:
        # leave the process group explicitly: tearing it down in interpreter shutdown has been seen to
        # abort with "terminate called without an active exception"
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    cli()
