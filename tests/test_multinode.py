"""Scaling out: two real nodes through the real launchers, and resuming on another cluster size or ZeRO stage.

The cluster (tests/cluster.py) is two OpenSSH servers on 127.0.0.2 and 127.0.0.3 of this machine, reached
through an `ssh` wrapper with a throw-away key; pdsh starts DeepSpeed's per-node launcher on each, exactly
as on a real cluster, and the ranks' environment travels in a `.deepspeed_env` file (DS_ENV_FILE). Each
node holds one rank (`slots=1`), so 2 ranks run on 2 nodes. The tests skip, saying why, where sshd or pdsh
is missing (.ci/run installs them). Every run is the tiny config (2 layers x 32 dims, 20 steps).

Tolerances (nats/token, per-step training loss):
- 2 nodes vs 1 node (ZeRO-2 and ZeRO-3, 2 ranks each), and FSDP over 2 nodes: 1e-5. The same maths on the
  same batches; only the all-reduce differs (DeepSpeed's shared-memory op on one node, gloo over TCP across
  nodes), which changes fp32 summation order (~1e-7 seen, as between ZeRO stages).
- a resume on the same cluster (the Slurm-style launch): exact.
- a resume on another number of ranks, the global batch kept: 1e-5 (~1e-7 seen). A micro batch is named by
  its place in the global batch, so 1 rank x accumulation 2 trains on the batches 2 ranks x 1 did.
- a resume into ZeRO-3 through a universal checkpoint: 1e-3 (~2e-4 seen after 10 steps: the first step
  matches to 1e-7, and DeepSpeed's ZeRO-3 universal loader restores an optimizer state that is close to,
  but not bit-equal with, the saved one; ZeRO-3 -> ZeRO-2 is exact).
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from cluster import TwoNodeCluster, missing_tools
from test_training import (DEEPSPEED, REPO, TINY_CONFIG, TORCHRUN, check_finished, env_for_cpu_ranks, records,
                           train_losses)
from training.checkpointing import layout as ckpt
from training.checkpointing import universal
from training import hostfile
from training.distributed import free_port

NODE_TOLERANCE = 1e-5  # 2 nodes vs 1 node, and a resume on another number of ranks (fp32 sum order)
ZERO3_UNIVERSAL_TOLERANCE = 1e-3  # a resume into ZeRO-3 through a universal checkpoint (2e-4 seen)

pytestmark = pytest.mark.slow


def deepspeed_env() -> dict:
    """What the remote ranks need, the DeepSpeed way (.deepspeed_env): the CPU accelerator, one thread per
    rank, the repository on the path, the compiled shm op's cache, and gloo on the loopback interface."""
    env = env_for_cpu_ranks()
    return {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled",
            "PYTHONUNBUFFERED": "1", "TORCH_EXTENSIONS_DIR": env["TORCH_EXTENSIONS_DIR"], "GLOO_SOCKET_IFNAME": "lo"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = missing_tools()
    if why:
        pytest.skip(f"no two-node test cluster on this machine: {why}")
    env = env_for_cpu_ranks()
    env["GLOO_SOCKET_IFNAME"] = "lo"
    with TwoNodeCluster(tmp_path_factory.mktemp("cluster"), env, deepspeed_env()) as c:
        yield c


def two_node_deepspeed(cluster, out_dir, ds_config, *extra, timeout=300) -> subprocess.CompletedProcess:
    """`deepspeed --hostfile hosts --master_addr 127.0.0.2 training/pretrain.py ...` (pdsh to both nodes)."""
    cmd = [DEEPSPEED, "--hostfile", str(cluster.hostfile), "--master_addr", cluster.master_addr,
           "--master_port", str(free_port()), "training/pretrain.py", "--config", str(TINY_CONFIG),
           "--deepspeed_config", str(ds_config), "--out_dir", str(out_dir), *extra]
    return subprocess.run(cmd, cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=timeout)


def one_node_deepspeed(out_dir, ds_config, *extra, nproc=2, timeout=300) -> subprocess.CompletedProcess:
    cmd = [DEEPSPEED, "--num_gpus", str(nproc), "--master_port", str(free_port()), "training/pretrain.py",
           "--config", str(TINY_CONFIG), "--deepspeed_config", str(ds_config), "--out_dir", str(out_dir), *extra]
    return subprocess.run(cmd, cwd=REPO, env=env_for_cpu_ranks(), capture_output=True, text=True, timeout=timeout)


def on_every_node(cluster, command: str, timeout=300) -> list[tuple[int, str]]:
    """`command` (with {node_rank}) started on each node over ssh at once, as Slurm's srun would: the
    environment is stated on the command line (srun would pass the job's); returns (exit code, output)."""
    env = " ".join(f"{k}={v}" for k, v in deepspeed_env().items())
    procs = [cluster.ssh(node, f"cd {REPO} && env {env} {command.format(node_rank=rank)}", stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True) for rank, node in enumerate(cluster.nodes)]
    results = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
        results.append((p.returncode, out))
    return results


def resumed_copy(source: Path, dest: Path, tag="step_000010") -> Path:
    """dest/ckpt holding only source's checkpoint `tag`, marked latest: a run continues from there."""
    (dest / "ckpt").mkdir(parents=True)
    shutil.copytree(source / "ckpt" / tag, dest / "ckpt" / tag)
    (dest / "ckpt" / "latest").write_text(tag)
    return dest


def worst_difference(reference: dict, got: dict, steps) -> float:
    assert sorted(got) == list(steps), sorted(got)
    return max(abs(reference[s] - got[s]) for s in steps)


# ----------------------------------------------------------------------------- runs shared by the tests
@pytest.fixture(scope="module")
def one_node(two_rank_run) -> Path:
    """The reference: 2 ranks on one node, ZeRO-2, 20 steps, checkpoints at 10 and 20 (the run of
    test_training.py's stage tests, conftest.two_rank_run)."""
    return two_rank_run("zero2")["full"]


@pytest.fixture(scope="module")
def two_nodes(cluster, tiny_data, ds_configs, tmp_path_factory) -> dict[str, dict]:
    """The same run on 2 nodes x 1 rank, under ZeRO-2 and ZeRO-3, both nodes writing one shared out_dir."""
    root = tmp_path_factory.mktemp("two_nodes")
    runs = {}
    for stage in ("zero2", "zero3"):
        out = root / stage
        proc = two_node_deepspeed(cluster, out, ds_configs[stage], "--data_dir", str(tiny_data))
        check_finished(proc, out)
        runs[stage] = {"out": out, "log": proc.stdout + proc.stderr}
    return runs


# ----------------------------------------------------------------------------- two nodes
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_two_nodes_train_like_one_node(cluster, two_nodes, one_node, stage):
    run = two_nodes[stage]
    log = run["log"]
    assert "nnodes=2, num_local_procs=1, node_rank=1" in log and "nnodes=2, num_local_procs=1, node_rank=0" in log
    # the ranks' environment went the DeepSpeed way, from the test's file, not from the repository or ~
    assert f"deepspeed_env file = {cluster.root / '.deepspeed_env'}" in log and "export DS_ACCELERATOR=cpu;" in log
    assert not (REPO / ".deepspeed_env").exists() and not (Path.home() / ".deepspeed_env").exists()
    assert "2 nodes joined (2 ranks)" in log, log[-3000:]
    config = records(run["out"], "config")[0]
    assert config["world_size"] == 2 and config["zero_stage"] == int(stage[-1])
    worst = worst_difference(train_losses(one_node), train_losses(run["out"]), range(1, 21))
    assert worst < NODE_TOLERANCE, f"2 nodes differ from 1 node by {worst:.2e} nats/token"
    # both nodes wrote their shards into the one shared out_dir, and rank 0 verified them all
    tag_dir = run["out"] / "ckpt" / "step_000020"
    assert ckpt.verify(tag_dir) is None
    shard = "zero_pp_rank_{}_mp_rank_00_optim_states.pt" if stage == "zero3" else "*zero_pp_rank_{}_mp_rank_00_optim_states.pt"
    assert all(list(tag_dir.glob(shard.format(r))) for r in (0, 1)), sorted(p.name for p in tag_dir.iterdir())
    assert (run["out"] / "export" / "model.safetensors").is_file()


def test_slurm_style_launch_resumes_the_two_node_run_exactly(cluster, two_nodes, tiny_data, ds_configs, tmp_path):
    """`deepspeed --hostfile hosts --no_ssh --node_rank=N` started on each node by itself (what an srun
    line does), resuming the 2-node ZeRO-2 run from its step-10 checkpoint in the shared out_dir."""
    full = two_nodes["zero2"]["out"]
    out = resumed_copy(full, tmp_path / "resumed")
    port = free_port()
    results = on_every_node(cluster, f"{DEEPSPEED} --hostfile {cluster.hostfile} --no_ssh --node_rank={{node_rank}} "
                                     f"--master_addr {cluster.master_addr} --master_port {port} training/pretrain.py "
                                     f"--config {TINY_CONFIG} --deepspeed_config {ds_configs['zero2']} "
                                     f"--out_dir {out} --data_dir {tiny_data} --resume")
    check_nodes_finished(results, out)
    full_losses, resumed = train_losses(full), train_losses(out)
    assert sorted(resumed) == list(range(11, 21))
    assert all(resumed[s] == full_losses[s] for s in resumed), (resumed, full_losses)  # exact
    assert records(out, "resumed")[0]["universal"] is False


def check_nodes_finished(results, out_dir) -> None:
    """Every node's launcher succeeded, by check_finished's rule (exit 0, or only gloo's known teardown abort
    after the run wrote its "done" record and a verified checkpoint)."""
    for rc, output in results:
        check_finished(subprocess.CompletedProcess([], rc, output, ""), out_dir)


def test_fsdp_across_two_nodes_with_torchrun_then_reshards_to_one_rank(cluster, one_node, tiny_data, tmp_path):
    """FSDP2 on 2 nodes: `torchrun --nnodes 2 --node_rank N --rdzv_endpoint 127.0.0.2:PORT` on each node;
    then its checkpoint resumes on 1 rank (DCP reshards) and continues the curve (global batch kept)."""
    out = tmp_path / "fsdp"
    port = free_port()
    results = on_every_node(cluster, f"{TORCHRUN} --nnodes 2 --node_rank {{node_rank}} --nproc_per_node 1 "
                                     f"--rdzv_endpoint {cluster.master_addr}:{port} training/pretrain.py "
                                     f"--config {TINY_CONFIG} --engine=fsdp --out_dir {out} --data_dir {tiny_data}")
    check_nodes_finished(results, out)
    assert "2 nodes joined (2 ranks)" in results[0][1]
    fsdp = train_losses(out)
    worst = worst_difference(train_losses(one_node), fsdp, range(1, 21))
    assert worst < NODE_TOLERANCE, f"FSDP on 2 nodes differs from ZeRO-2 on 1 node by {worst:.2e}"
    # resharding: the 2-rank FSDP checkpoint on 1 rank, accumulation 1 -> 2
    resumed = resumed_copy(out, tmp_path / "fsdp_one_rank")
    cmd = [TORCHRUN, "--nproc_per_node", "1", "--master_port", str(free_port()), "training/pretrain.py",
           "--config", str(TINY_CONFIG), "--out_dir", str(resumed), "--resume", "--data_dir", str(tiny_data)]
    proc = subprocess.run(cmd, cwd=REPO, env=env_for_cpu_ranks(), capture_output=True, text=True, timeout=300)
    check_finished(proc, resumed)
    assert "gradient_accumulation_steps 1 -> 2" in proc.stdout + proc.stderr
    worst = worst_difference(fsdp, train_losses(resumed), range(11, 21))
    assert worst < NODE_TOLERANCE, f"FSDP resumed on 1 rank departs from the 2-rank curve by {worst:.2e}"


def test_launch_sh_with_a_hostfile_trains_on_both_nodes(cluster, tmp_path):
    env = dict(cluster.env)
    env.pop("OMP_NUM_THREADS")  # launch.sh chooses it
    env.update(CONFIG=str(TINY_CONFIG), OUT_DIR=str(tmp_path / "out"), DATA_DIR=str(tmp_path / "data"),
               MAX_ITERS="4", SAMPLES="0", HOSTFILE=str(cluster.hostfile), MASTER_ADDR=cluster.master_addr)
    proc = subprocess.run(["bash", "launch.sh", "--eval_interval=2"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=400)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert "2 nodes joined (2 ranks)" in output and "127.0.0.3: " in output
    assert records(tmp_path / "out")[-1]["kind"] == "done"
    assert "val NELBO" in output


# ----------------------------------------------------------------------------- bad hostfiles, lonely nodes
def launch_sh(env_update: dict, tmp_path, *extra, env=None) -> subprocess.CompletedProcess:
    env = dict(env or env_for_cpu_ranks())
    env.update({"CONFIG": str(TINY_CONFIG), "OUT_DIR": str(tmp_path / "out"), "DATA_DIR": str(tmp_path / "data"),
                "MAX_ITERS": "2", "SAMPLES": "0", **env_update})
    return subprocess.run(["bash", "launch.sh", *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("content, message", [
    (None, "does not exist (a typo?)"),
    ("node0 slots=1\nnode1 gpus=2\n", "line 2: 'node1 gpus=2' is not 'HOST slots=N'"),
    ("# nothing\n\n", "lists no node"),
    ("node0 slots=1\nnode0 slots=1\n", "node0 is listed twice"),
])
def test_launch_sh_refuses_a_bad_hostfile(tmp_path, content, message):
    hosts = tmp_path / "hosts"
    if content is not None:
        hosts.write_text(content)
    proc = launch_sh({"HOSTFILE": str(hosts)}, tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert message in proc.stderr and "refused" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "out" / "metrics.jsonl").exists() and not (tmp_path / "data").exists()  # nothing started or prepared


def test_nproc_that_disagrees_with_the_slots_is_refused(tmp_path):
    (tmp_path / "hosts").write_text("127.0.0.2 slots=1\n127.0.0.3 slots=1\n")
    proc = launch_sh({"HOSTFILE": str(tmp_path / "hosts"), "NPROC": "2"}, tmp_path)
    assert proc.returncode == 2
    assert "--num_gpus 2 (NPROC) disagrees with hostfile" in proc.stderr and "127.0.0.2 slots=1" in proc.stderr


def test_an_unreachable_node_is_named_with_the_ssh_check(cluster, tmp_path):
    """127.0.0.4 runs no sshd: the check names it (and not the node that answers) and the command to try."""
    (tmp_path / "hosts").write_text("127.0.0.2 slots=1\n127.0.0.4 slots=1\n")
    proc = launch_sh({"HOSTFILE": str(tmp_path / "hosts")}, tmp_path, env=cluster.env)
    assert proc.returncode == 2
    assert "127.0.0.4:" in proc.stderr and "127.0.0.2:" not in proc.stderr, proc.stderr
    assert "ssh -o BatchMode=yes 127.0.0.4 true" in proc.stderr


def test_a_hostfile_of_one_node_warns_that_only_one_node_joined(cluster, tiny_data, tmp_path):
    """DeepSpeed starts every rank of a one-host hostfile on this machine (here: 2 local ranks), whatever
    host the file names."""
    (tmp_path / "hosts").write_text("127.0.0.3 slots=2\n")
    proc = launch_sh({"HOSTFILE": str(tmp_path / "hosts"), "DATA_DIR": str(tiny_data),
                      "MASTER_ADDR": cluster.master_addr}, tmp_path, env=cluster.env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "WARNING: hostfile" in proc.stdout and "lists one node (127.0.0.3)" in proc.stdout


def test_hostfile_parser_and_launch_info(tmp_path, monkeypatch):
    (tmp_path / "hosts").write_text("# two nodes\nnode0 slots=8\nnode1 slots=8  # the second\n")
    assert hostfile.parse(tmp_path / "hosts") == {"node0": 8, "node1": 8}
    hostfile.check_slots({"node0": 8}, 8, "hosts")
    monkeypatch.setenv("HOSTFILE", str(tmp_path / "hosts"))
    monkeypatch.setenv("CROSS_SIZE", "1")
    warning = hostfile.single_node_warning(hostfile.launch_info())
    assert "lists 2 nodes (node0, node1) but only one node joined" in warning
    monkeypatch.setenv("CROSS_SIZE", "2")
    assert hostfile.single_node_warning(hostfile.launch_info()) is None


# ----------------------------------------------------------------------------- another cluster size / stage
def test_zero2_checkpoint_of_two_ranks_resumes_on_one_rank(one_node, ds_configs, tiny_data, tmp_path):
    out = resumed_copy(one_node, tmp_path / "one_rank")
    proc = one_node_deepspeed(out, ds_configs["zero2"], "--resume", "--data_dir", str(tiny_data), nproc=1)
    check_finished(proc, out)
    log = proc.stdout + proc.stderr
    assert "2 -> 1 rank(s): global batch kept at 2 x 8 sequences, gradient_accumulation_steps 1 -> 2" in log
    assert "through a DeepSpeed universal checkpoint" in log
    assert records(out, "resumed")[0]["universal"] is True
    worst = worst_difference(train_losses(one_node), train_losses(out), range(11, 21))
    assert worst < NODE_TOLERANCE, f"1 rank departs from the 2-rank curve by {worst:.2e}"
    assert (out / "ckpt" / "step_000010" / universal.UNIVERSAL / "zero").is_dir()


def test_zero2_checkpoint_resumes_under_zero3(one_node, ds_configs, tiny_data, tmp_path):
    out = resumed_copy(one_node, tmp_path / "to_zero3")
    proc = one_node_deepspeed(out, ds_configs["zero3"], "--resume", "--data_dir", str(tiny_data))
    check_finished(proc, out)
    assert "ZeRO-2 on 2 rank(s) -> ZeRO-3 on 2 rank(s)" in proc.stdout + proc.stderr
    worst = worst_difference(train_losses(one_node), train_losses(out), range(11, 21))
    assert worst < ZERO3_UNIVERSAL_TOLERANCE, f"ZeRO-3 departs from the ZeRO-2 curve by {worst:.2e}"
    assert abs(train_losses(one_node)[11] - train_losses(out)[11]) < NODE_TOLERANCE  # the first step: same state


def test_zero3_checkpoint_of_two_nodes_resumes_under_zero2_on_one_node(two_nodes, ds_configs, tiny_data, tmp_path):
    full = two_nodes["zero3"]["out"]
    out = resumed_copy(full, tmp_path / "to_zero2")
    proc = one_node_deepspeed(out, ds_configs["zero2"], "--resume", "--data_dir", str(tiny_data))
    check_finished(proc, out)
    worst = worst_difference(train_losses(full), train_losses(out), range(11, 21))
    assert worst < NODE_TOLERANCE, f"ZeRO-2 departs from the ZeRO-3 curve by {worst:.2e}"


def test_zero0_and_zero_stages_do_not_convert_into_each_other(tmp_path):
    from training.checkpointing.checkpointer import ResumePoint

    saved = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "train_batch_size": 16,
             "zero_optimization": {"stage": 0}}
    point = ResumePoint("step_000010", tmp_path / "step_000010", [], {}, saved)
    point.plan_resharding({"zero_optimization": {"stage": 0}}, world=1)  # ZeRO-0: whole state, any world
    assert not point.universal
    with pytest.raises(ValueError, match=r"holds ZeRO-0 optimizer state and this run uses ZeRO-2.*ZERO=0 bash launch.sh --resume"):
        point.plan_resharding({"zero_optimization": {"stage": 2}}, world=2)


def test_universal_conversion_of_something_else_is_a_clear_error(tmp_path):
    (tmp_path / "step_000010").mkdir()
    for target in (tmp_path / "missing", tmp_path / "step_000010", tmp_path):
        with pytest.raises(ValueError, match="not a DeepSpeed checkpoint"):
            universal.to_universal(target)
    assert not (tmp_path / "step_000010" / universal.UNIVERSAL).exists()  # nothing written
