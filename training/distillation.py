"""Distillation as a training mode: --distill_from TEACHER trains a student that samples in fewer steps.

    # the quickstart MDLM (64 steps = one token per step) -> 32 -> 16 -> 8 steps, three rounds of 200 steps
    deepspeed --num_gpus 2 training/pretrain.py --config training/configs/shakespeare_distill.json

The loss is models/distillation.py's (SDTT: one student step matches two teacher steps); this module runs
it in the same loop, engines, checkpoints and logs as any other objective:
  - The student starts from the teacher's weights (init_from defaults to distill_from).
  - Rounds: the teacher samples in distill_steps * 2^rounds steps; round k (1..R) trains a student for half
    the steps of its teacher, and that student is round k+1's teacher. max_iters is split evenly over the
    rounds. distill_rounds=0 derives R from the teacher: from one token per step (model.block_size), or from
    the steps an already distilled teacher records.
  - The teacher is frozen: eval mode, no gradients, outside the student's module tree (the engine never
    shards it, never hands it to the optimizer, never saves it). At the end of round k the student is
    checkpointed and exported to OUT/rounds/round_k (the last round's is OUT/export) and loaded as the
    next teacher; a resumed run takes its round's teacher from there (or from distill_from in round 1).
  - Validation reports the student's own NELBO (the ordinary val loss); the train loss is the divergence.
  - Every export records what it was distilled for (`distillation_record`): inference.sample and the
    server decode ancestrally with its step count unless told otherwise.
MDLM (whole canvas) teachers only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from models.diffusion import NoiseSchedule
from models.distillation import DIVERGENCES, distillation_loss
from models.gpt import GPT, GPT2_NAMES, is_hf_gpt2_dir
from training.checkpointing import layout as ckpt
from training.engines.interface import TrainingModule
from training.distributed import barrier
from training.init_from import InitSource, load_weights, read_source

ROUNDS_DIR = "rounds"  # OUT/rounds/round_k: the student at the end of round k (the teacher of round k + 1)


@dataclass(frozen=True)
class RoundPlan:
    """Which teacher and how many student steps at each training step."""
    teacher_steps: int  # the first round's teacher: distill_steps * 2^rounds
    rounds: int
    round_iters: int  # optimizer steps per round

    @classmethod
    def of(cls, cfg) -> "RoundPlan":
        return cls(cfg.distill_steps * 2 ** cfg.distill_rounds, cfg.distill_rounds, cfg.max_iters // cfg.distill_rounds)

    def training_round(self, step: int) -> int:
        """The round (1..R) that the optimizer step after `step` belongs to."""
        return min(step // self.round_iters, self.rounds - 1) + 1

    def weights_round(self, step: int) -> int:
        """The round whose student the weights after `step` steps are (0: the teacher's, untouched)."""
        return min(math.ceil(step / self.round_iters), self.rounds)

    def student_steps(self, round_: int) -> int:
        """The steps the student of round `round_` samples in (round 0: the teacher's)."""
        return self.teacher_steps // 2 ** round_


def round_dir(out_dir, round_: int) -> Path:
    return Path(out_dir) / ROUNDS_DIR / f"round_{round_}"


def distillation_record(train_config: dict, step: int) -> Optional[dict]:
    """What the weights after `step` steps of a run were distilled for (None: not a distillation run); every
    export of the run carries it in config.json as "distillation", and inference decodes with its `steps`."""
    if not train_config.get("distill_from"):
        return None
    plan = RoundPlan(train_config["distill_steps"] * 2 ** train_config["distill_rounds"],
                     train_config["distill_rounds"], train_config["max_iters"] // train_config["distill_rounds"])
    done = plan.weights_round(step)
    return {"teacher": train_config["distill_from"], "teacher_steps": plan.teacher_steps,
            "steps": plan.student_steps(done), "round": done, "rounds": plan.rounds,
            "steps_per_round": [plan.student_steps(k) for k in range(1, plan.rounds + 1)],
            "round_iters": plan.round_iters, "divergence": train_config["distill_divergence"]}


# ----------------------------------------------------------------------------- the teacher
def read_teacher(spec: str) -> InitSource:
    """The teacher's weights and what it was trained for (an export, a run dir or one ckpt/step_N dir)."""
    if spec in GPT2_NAMES or is_hf_gpt2_dir(Path(spec)):
        raise ValueError(f"--distill_from {spec}: GPT-2 is an autoregressive model; distillation through time "
                         f"needs a masked-diffusion (mdlm) teacher: an export or run dir of ours")
    if not Path(spec).exists():
        raise FileNotFoundError(f"--distill_from {spec}: no such directory. Give the teacher's export/ folder, its "
                                f"training run's out_dir or one ckpt/step_N folder (bash launch.sh trains one into "
                                f"out/shakespeare_mdlm)")
    return read_source(spec)


def check_distillation(cfg, data_tokenizer: dict, explicit: set) -> None:
    """A usable teacher for this run (ValueError naming what is wrong and the fix); fills in cfg.distill_rounds
    when it is 0 and checks that the rounds split max_iters evenly. explicit: the keys the config states (a
    student's model.shift that init_from would not adopt from the teacher)."""
    spec = cfg.distill_from
    teacher = read_teacher(spec)
    if teacher.objective == "ar":
        raise ValueError(f"--distill_from {spec} is an autoregressive (ar) model; distillation through time needs a "
                         f"masked-diffusion (mdlm) teacher, e.g. the quickstart's out/shakespeare_mdlm")
    if teacher.objective != "mdlm":
        raise ValueError(f"--distill_from {spec} is a {teacher.objective} model; distillation is implemented for "
                         f"mdlm (whole-canvas) teachers only")
    if teacher.tokenizer is not None and teacher.tokenizer != data_tokenizer:
        raise ValueError(f"--distill_from {spec} was trained on {teacher.tokenizer.get('tokenizer')!r} ids "
                         f"({teacher.tokenizer.get('vocab_size', '?')}), --data_dir={cfg.data_dir} holds "
                         f"{data_tokenizer.get('tokenizer')!r} ids ({data_tokenizer.get('vocab_size', '?')}): the "
                         f"teacher's predictions would mean other tokens. Use data prepared with the teacher's "
                         f"tokenizer (python -m training.prepare --tokenizer ...)")
    if cfg.model.vocab_size and teacher.model.vocab_size != cfg.model.vocab_size:
        raise ValueError(f"--distill_from {spec} has vocab_size={teacher.model.vocab_size} embedding rows, the student "
                         f"model.vocab_size={cfg.model.vocab_size}; drop --model.vocab_size (0 takes the data's)")
    if "model.shift" in explicit and cfg.model.shift != teacher.model.shift:
        raise ValueError(f"--distill_from {spec} has model.shift={teacher.model.shift}; the student must predict the "
                         f"same positions: drop --model.shift")
    if not cfg.init_from:
        cfg.init_from = spec  # the student starts as a copy of its teacher
    if cfg.distill_rounds == 0:
        # one token per step, unless the teacher is itself distilled
        own = (teacher.distillation or {}).get("steps") or cfg.model.block_size
        ratio = own / cfg.distill_steps
        if ratio < 2 or ratio != int(ratio) or int(ratio) & (int(ratio) - 1):
            halvings = [own // 2 ** k for k in range(1, int(math.log2(own)) + 1) if own % 2 ** k == 0]
            raise ValueError(f"distill_steps={cfg.distill_steps} is not the teacher's {own} steps halved one or more "
                             f"times (each round halves the steps): choose one of "
                             f"{', '.join(map(str, halvings)) or 'none'}, or state --distill_rounds=R to start the "
                             f"teacher at distill_steps * 2^R steps")
        cfg.distill_rounds = int(math.log2(ratio))
    cfg.__post_init__()  # the rounds against max_iters


def load_teacher(spec) -> GPT:
    """The frozen teacher: weights from `spec`, eval mode, no gradients."""
    source = read_source(str(spec))
    teacher = GPT(source.model)
    load_weights(teacher, source)
    return teacher.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- the training module
class DistillationModule(TrainingModule):
    """The student GPT and its frozen teacher: forward(x, y, seed) -> the distillation loss in training mode,
    the student's NELBO in eval mode (validation). The teacher is kept out of the module tree (set through
    the instance dict, not nn.Module's registration), so parameters(), state_dict(), the engine's sharding
    and the optimizer see the student alone."""

    def __init__(self, gpt: GPT, objective, mask_id: int, divergence: str):
        super().__init__(gpt, objective, mask_id)
        self.divergence = divergence
        self.student_steps = 0  # set with the teacher, per round
        self.__dict__["teacher"] = None  # not a submodule (see the class docstring)

    def set_teacher(self, teacher: GPT, student_steps: int) -> None:
        self.__dict__["teacher"] = teacher
        self.student_steps = student_steps

    def forward(self, x, y, seed: int, future_attention: float = 1.0):
        if not self.training:
            return super().forward(x, y, seed, future_attention)
        teacher = self.teacher
        if teacher.lm_head.weight.device != x.device:  # the engine moved the student; the teacher follows
            teacher.to(x.device)
        return distillation_loss(self.gpt, teacher, x, NoiseSchedule(self.objective.schedule), self.mask_id, seed,
                                 self.student_steps, self.divergence, antithetic=self.objective.antithetic,
                                 masking_impl=self.objective.masking_impl)


class DistillationRounds:
    """Puts the right teacher in the module before each step: round 1's from distill_from, round k + 1's the
    student at the end of round k (checkpointed and exported to OUT/rounds/round_k on the way)."""

    def __init__(self, cfg, module: DistillationModule, rank: int):
        self.cfg, self.module, self.rank = cfg, module, rank
        self.plan = RoundPlan.of(cfg)
        self.round = 0  # the round whose teacher is loaded (0: none yet)

    def begin_step(self, step: int, engine, checkpointer, metrics, tokens_seen: int) -> None:
        r = self.plan.training_round(step)
        if r == self.round:
            return
        if r == 1:
            spec = self.cfg.distill_from
        else:
            spec = round_dir(self.cfg.out_dir, r - 1)
            if ckpt.checkpoint_kind(spec) != "consolidated":
                self._export_round(r - 1, step, engine, checkpointer, tokens_seen)
        N = self.plan.student_steps(r)
        self.module.set_teacher(load_teacher(spec), N)
        self.round = r
        end = min(r * self.plan.round_iters, self.cfg.max_iters)
        metrics.print(f"distillation round {r}/{self.plan.rounds} (steps {step}..{end}): teacher {spec} at {2 * N} "
                      f"steps -> student at {N} steps, {self.cfg.distill_divergence} divergence")
        metrics.log("distill_round", step, round=r, rounds=self.plan.rounds, teacher=str(spec), teacher_steps=2 * N,
                    student_steps=N, divergence=self.cfg.distill_divergence)

    def _export_round(self, k: int, step: int, engine, checkpointer, tokens_seen: int) -> None:
        """The student at the end of round k -> OUT/rounds/round_k (through a checkpoint at that step, as the
        final export goes: every engine and ZeRO stage consolidates the same way)."""
        if step != k * self.plan.round_iters:
            raise RuntimeError(f"{round_dir(self.cfg.out_dir, k)} is missing: it holds the student of round {k}, the "
                               f"teacher of step {step}. Restore it (python -m training.export --ckpt "
                               f"{self.cfg.out_dir}/ckpt/{ckpt.tag_for(k * self.plan.round_iters)} --out "
                               f"{round_dir(self.cfg.out_dir, k)}) or start the run again")
        tag = checkpointer.last_tag
        if tag != ckpt.tag_for(step):
            tag = checkpointer.save(engine, step, tokens_seen)
        if self.rank == 0:
            from training.export import export_checkpoint  # imports DeepSpeed's consolidation lazily
            export_checkpoint(checkpointer.root / tag, round_dir(self.cfg.out_dir, k))
        barrier()


def training_module(cfg, gpt: GPT, mask_id: int, rank: int):
    """(the module the engine wraps, its DistillationRounds or None): the objective's loss, or distillation
    from cfg.distill_from."""
    if not cfg.distill_from:
        return TrainingModule(gpt, cfg.objective, mask_id), None
    module = DistillationModule(gpt, cfg.objective, mask_id, cfg.distill_divergence)
    return module, DistillationRounds(cfg, module, rank)


def check_config(cfg) -> None:
    """The distillation keys of a TrainConfig (training/config.py calls this from __post_init__)."""
    if not cfg.distill_from:
        return
    if cfg.distill_steps < 1:
        raise ValueError(f"--distill_from needs --distill_steps=N >= 1, the steps the student should sample in "
                         f"(got {cfg.distill_steps}); e.g. --distill_steps=8 from a 64-token teacher is 3 rounds")
    if cfg.distill_divergence not in DIVERGENCES:
        raise ValueError(f"distill_divergence={cfg.distill_divergence!r}: expected one of {' | '.join(DIVERGENCES)}")
    if cfg.objective.name != "mdlm":
        raise ValueError(f"distillation trains an mdlm student (whole canvas); objective is {cfg.objective.name!r}: "
                         f"drop --objective or set --objective=mdlm")
    if cfg.anneal_attention_iters:
        raise ValueError("anneal_attention_iters is for training a diffusion model from an AR one; a distilled "
                         "student keeps its teacher's attention: drop it")
    if cfg.distill_rounds < 0:
        raise ValueError(f"distill_rounds must be >= 0 (0: from the teacher's steps), got {cfg.distill_rounds}")
    if cfg.distill_rounds and cfg.max_iters % cfg.distill_rounds:
        lo = cfg.max_iters // cfg.distill_rounds * cfg.distill_rounds
        raise ValueError(f"max_iters={cfg.max_iters} does not split evenly over {cfg.distill_rounds} rounds; use "
                         f"--max_iters={lo or cfg.distill_rounds} or --max_iters={lo + cfg.distill_rounds}")
