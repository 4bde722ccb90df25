"""Test-wide setup. Runs before any test module imports the kernels."""
import json
import os
import random
from pathlib import Path

import pytest
import torch

from training.cpu_comm_op import OP_CACHE

# Triton kernels are decorated at import time; the interpreter must be chosen before that.
# Without a GPU the Triton tests run in the interpreter on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Never reach for the network in tests (wandb, HF hub, datasets).
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# DeepSpeed's CPU shm communication op is compiled on first use (~40 s of both cores): one cache for every run a
# test starts (launch.sh and the benchmarks default to the same folder), built once per checkout.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(OP_CACHE))

# The tests' models are tiny: per-op overhead dominates and extra intra-op threads only add contention
# (on a busy 2-core machine, 2 OpenMP threads made single tests 20-100x slower). Subprocesses the tests
# launch (deepspeed ranks) set their own OMP_NUM_THREADS.
torch.set_num_threads(1)


# what a launcher or training.distributed.prepare_environment() sets: inherited by every later subprocess
LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _process_state_is_left_as_found():
    """Tests share one process. Code under test that switches autograd off globally (a CLI's
    torch.set_grad_enabled(False) called in-process) breaks every later test that trains; rank variables
    left in os.environ (a MASTER_PORT of a finished run) make later training subprocesses reuse a port or
    believe a launcher started them. Fail the test that leaks either, and restore the state for the rest."""
    env = {name: os.environ.get(name) for name in LAUNCH_VARIABLES}
    yield
    leaked = [name for name in LAUNCH_VARIABLES if os.environ.get(name) != env[name]]
    for name in leaked:
        if env[name] is None:
            os.environ.pop(name)
        else:
            os.environ[name] = env[name]
    grad_off = not torch.is_grad_enabled()
    torch.set_grad_enabled(True)
    assert not grad_off, "the test left autograd disabled (torch.set_grad_enabled(False) outside a with-block)"
    assert not leaked, f"the test left {leaked} changed in os.environ"


# ----------------------------------------------------------------------------- data and runs shared by modules
# Session fixtures live here, once: a session fixture imported into several test modules is a fixture of each
# module and runs once per module.
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A ~60k-character corpus of made-up verse, prepared with the char tokenizer by the real CLI (its main,
    in this process)."""
    from training import prepare

    root = tmp_path_factory.mktemp("tiny_data")
    rng = random.Random(0)
    words = ("thou art the sun and moon my lord good night sweet prince what light through yonder window "
             "breaks speak again bright angel fair is foul and foul is fair").split()
    lines = []
    for i in range(2000):
        speaker = rng.choice(["ROMEO", "JULIET", "HAMLET", "MACBETH"])
        lines.append(f"{speaker}:\n" + " ".join(rng.choice(words) for _ in range(rng.randint(4, 9))) + ".\n")
    (root / "verse.txt").write_text("\n".join(lines))
    out = root / "char"
    prepare.main(["--source", str(root / "verse.txt"), "--tokenizer", "char", "--out", str(out)])
    return out


@pytest.fixture(scope="session")
def ds_configs(tmp_path_factory) -> dict[str, Path]:
    """The shipped JSONs (ds_configs/zero*.json, by name); for ZeRO-3 with a persistence threshold of 0,
    because the tiny model's tensors are all below DeepSpeed's default (1e5 elements) and would otherwise
    not be partitioned."""
    from training.engines.ds_config import load_ds_json, zero_stage

    root = tmp_path_factory.mktemp("ds_configs")
    out = {}
    for shipped in sorted((REPO / "ds_configs").glob("zero*.json")):
        d = load_ds_json(shipped)
        if zero_stage(d) == 3:
            d["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        out[shipped.stem] = root / shipped.name
        out[shipped.stem].write_text(json.dumps(d))
    return out


@pytest.fixture(scope="session")
def two_rank_run(tiny_data, ds_configs, tmp_path_factory):
    """two_rank_run(stage, *flags): `deepspeed --num_gpus 2 training/pretrain.py` of tiny_test.json on
    tiny_data (20 steps, checkpoints at 10 and 20) under that ZeRO stage, trained on first use and then shared:
    test_training's stage runs and FSDP reference and test_multinode's one-node reference are one run.
    Returns {"full": out_dir, "log": its output, "shm_left": the DeepSpeed /dev/shm buffers named after its
    port, listed as soon as it ended (a later run removes those of dead processes)}."""
    from test_training import check_finished, deepspeed_run

    root = tmp_path_factory.mktemp("two_rank_runs")
    done = {}

    def run(stage: str, *flags: str) -> dict:
        key = (stage, *flags)
        if key not in done:
            out = root / "_".join(key).replace("-", "").replace("=", "_")
            proc = deepspeed_run(out, ds_configs[stage], "--data_dir", str(tiny_data), *flags)
            check_finished(proc, out)
            port = proc.args[proc.args.index("--master_port") + 1]
            done[key] = {"full": out, "log": proc.stdout + proc.stderr,
                         "shm_left": sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))}
        return done[key]

    return run
