"""The project's own collectives and rank discovery, under the launch conditions of GPU clusters.

On GPUs DeepSpeed creates the default process group with backend "nccl", which torch maps to the cuda
device type only: a collective on CPU tensors there raises. The CPU test machine cannot run NCCL, so
tests/cuda_only_group.py builds the same condition with gloo ("cuda:gloo"); the real NCCL run is in
bench/gpu_check.sh (a 2-GPU DeepSpeed run, where 2 GPUs exist)."""
import ast
import shutil
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.ports import free_port
from training import distributed, prepare

REPO = Path(__file__).resolve().parents[1]


def test_every_project_collective_works_when_the_default_group_serves_cuda_only():
    from tests.test_training import TEARDOWN_ABORT
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2", OMP_NUM_THREADS="1")
    ranks = [subprocess.Popen([sys.executable, str(REPO / "tests" / "cuda_only_group.py")], cwd=REPO,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    outputs = []
    try:
        for proc in ranks:
            out, err = proc.communicate(timeout=120)
            # the results line is printed before destroy_process_group: gloo's known teardown abort after it
            # (tests/test_training.py TEARDOWN_ABORT) is no failure of the collectives
            assert proc.returncode == 0 or (TEARDOWN_ABORT in err and out.strip()), err[-3000:]
            outputs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in ranks:
            proc.kill()
    for rank, got in enumerate(outputs):
        # the simulation is faithful: torch refuses CPU tensors on this default group
        assert "No backend type associated with device type cpu" in got["cpu_on_default"]
        assert got["all_mean"] == [1.5, 5.0]
        assert got["all_max"] == 3
        assert got["agreed"] is True and got["reason"] == "SIGTERM"
        assert got["broadcast"] == {"tag": "step_0"}
        assert got["gathered"] == [0, 1]


# every collective call is one of these names; init/destroy/new_group are set-up, not data
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast",
               "broadcast_object_list", "barrier", "reduce", "reduce_scatter", "gather", "gather_object",
               "scatter", "scatter_object_list", "all_to_all", "monitored_barrier", "send", "recv"}


def _direct_collective_calls(path: Path) -> list[str]:
    calls = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
            owner = ast.unparse(node.func.value)
            if owner in ("dist", "torch.distributed"):
                calls.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node.func)}")
    return calls


# bench/checkpoint_cost.py's worker times another checkout's training/ too (a baseline older than the helpers
# of training/distributed.py), so it calls torch.distributed itself; it runs on 2 CPU ranks over gloo only.
GLOO_ONLY = {REPO / "bench" / "checkpoint_cost.py"}


def test_the_project_issues_collectives_only_through_training_distributed():
    """So the host group above serves every one of them (a direct dist.barrier() under DeepSpeed's NCCL
    group would use the GPU, and a CPU tensor there raises)."""
    owner = REPO / "training" / "distributed.py"
    files = [p for folder in ("training", "inference", "evaluation", "models", "kernels", "common", "bench")
             for p in sorted((REPO / folder).rglob("*.py")) if p != owner and p not in GLOO_ONLY]
    assert len(files) > 40
    assert [call for p in files for call in _direct_collective_calls(p)] == []
    assert _direct_collective_calls(owner)  # the scan does see calls where they are
    assert all(_direct_collective_calls(p) for p in GLOO_ONLY)  # an exception only while it is needed


LAUNCHERS = {  # what each launcher sets for the second rank of two, on one node
    "deepspeed / torchrun": {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"},
    "openmpi": {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"},
    "mvapich": {"MV2_COMM_WORLD_RANK": "1", "MV2_COMM_WORLD_LOCAL_RANK": "1", "MV2_COMM_WORLD_SIZE": "2"},
    "mpich": {"PMI_RANK": "1", "MPI_LOCALRANKID": "1", "PMI_SIZE": "2"},
    "slurm (srun)": {"SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "2"},
}


@pytest.fixture
def clean_launch_env(monkeypatch):
    """No launcher's variables; afterwards the environment exactly as before. (monkeypatch.delenv of an
    absent name records nothing, so what prepare_environment sets, MASTER_PORT among them, would stay for
    every later test's subprocesses: hence the snapshot.)"""
    saved = dict(os.environ)
    yield _without_launch_variables(monkeypatch)
    os.environ.clear()
    os.environ.update(saved)


def _without_launch_variables(monkeypatch):
    for names in distributed.RANK_VARIABLES:
        for name in names:
            monkeypatch.delenv(name, raising=False)
    for name in ("MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR", "SLURM_NTASKS", "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)  # restored (or removed again) after the test
    monkeypatch.setattr(distributed, "_STARTED_BY_LAUNCHER", False)
    return monkeypatch


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_every_launcher_rank_is_known_before_deepspeed_discovers_it(clean_launch_env, launcher):
    for name, value in LAUNCHERS[launcher].items():
        clean_launch_env.setenv(name, value)
    distributed.prepare_environment()
    assert distributed.rank_and_world() == (1, 1, 2)
    # not turned into a world of one: DeepSpeed's MPI discovery still runs and agrees
    assert os.environ.get("WORLD_SIZE", "2") == "2"
    assert distributed._STARTED_BY_LAUNCHER


def test_a_plain_python_run_in_an_sbatch_script_is_a_world_of_one(clean_launch_env):
    """sbatch sets SLURM_PROCID=0 and SLURM_NTASKS for the whole allocation in the batch script itself;
    only srun's tasks (SLURM_STEP_NUM_TASKS) are ranks."""
    clean_launch_env.setenv("SLURM_PROCID", "0")
    clean_launch_env.setenv("SLURM_NTASKS", "8")
    clean_launch_env.setenv("SLURM_JOB_ID", "1234")
    distributed.prepare_environment()
    assert distributed.rank_and_world() == (0, 0, 1)
    assert os.environ["RANK"] == "0" and os.environ["WORLD_SIZE"] == "1"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="no mpirun (Debian: apt-get install openmpi-bin)")
def test_deepspeeds_openmpi_launcher_trains_two_ranks_that_know_their_rank(tmp_path):
    """`deepspeed --launcher openmpi` starts the ranks through mpirun: only OMPI_COMM_WORLD_* say which rank a
    process is until DeepSpeed's MPI discovery (mpi4py) runs. Both ranks must know it from the start: rank 1
    taking rank 0's run lock, or each rank training a world of one, fails this run."""
    from tests.test_training import TINY_CONFIG, check_finished, env_for_cpu_ranks, records

    data = tmp_path / "data"
    (tmp_path / "verse.txt").write_text("ROMEO:\nthou art the sun and moon my lord.\n" * 400)
    prepare.main(["--source", str(tmp_path / "verse.txt"), "--tokenizer", "char", "--out", str(data)])
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost slots=2\n")
    out = tmp_path / "run"
    mpirun_args = "--oversubscribe --mca btl_tcp_if_include lo" + (" --allow-run-as-root" if os.getuid() == 0 else "")
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--hostfile", str(hosts), "--launcher", "openmpi",
           "--force_multi", "--no_ssh_check", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "--launcher_args", mpirun_args, "training/pretrain.py", "--config", str(TINY_CONFIG),
           "--data_dir", str(data), "--out_dir", str(out), "--max_iters=4", "--eval_interval=4",
           "--deepspeed_config", "ds_configs/zero2.json"]
    proc = subprocess.run(cmd, cwd=REPO, env=env_for_cpu_ranks(), capture_output=True, text=True, timeout=300)
    check_finished(proc, out)
    (config,) = records(out, "config")
    assert config["world_size"] == 2
    assert "2 rank(s)" in proc.stdout + proc.stderr
