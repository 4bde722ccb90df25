"""What happens when things go wrong: bad inputs and real faults, as a new user meets them.

Every refusal below is specified the same way (`assert_refused`): a non-zero exit, no traceback, a
message that names the problem and the fix, and nothing on disk that existed before changed
(`DiskSnapshot` hashes the out_dir and data dir before and after). A refusal made before anything runs is
checked in this process (the command's main(argv), tests/in_process.py); one refusal per command runs as
a process, for the exit status and the absence of a traceback. The faults are real, not simulated:
two concurrent runs on one out_dir, a small tmpfs as a full disk (root only; skipped otherwise, with the
reason), SIGTERM to launch.sh alone and to the `deepspeed` launcher alone, SIGKILL in the middle of a save,
DeepSpeed buffers of dead processes in /dev/shm, a planted pickle that would run code.

Tiny models (training/configs/tiny_test.json) on a ~30k-character corpus: the whole file takes ~3.5 minutes
on 2 CPU cores, the tests that are not @slow ~25 s; the tests that train or launch several processes are @slow.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from in_process import pretrain_cli, run_cli
from training.checkpointing import layout as ckpt
from training.checkpointing import universal
from training.checkpointing.safe_load import UnsafeCheckpoint
from training import prepare
from training.data import CorruptData
from training.metrics import read_records
from training.run_lock import OutDirHoldsARun, claim_out_dir

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
TINY = str(REPO / "training/configs/tiny_test.json")


# ----------------------------------------------------------------------------- helpers
def cpu_env(**extra) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def run(cmd, timeout=180, **env) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=REPO, env=cpu_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def pretrain(*args, timeout=180) -> subprocess.CompletedProcess:
    """One process, no launcher: python training/pretrain.py --config tiny_test.json ARGS."""
    return run([PY, "training/pretrain.py", "--config", TINY, *args], timeout=timeout)


def refused(*args) -> subprocess.CompletedProcess:
    """training/pretrain.py --config tiny_test.json ARGS for an input it refuses before anything trains:
    called in this process (tests/in_process.py); test_a_bad_input_exits_1_with_one_line_and_no_traceback
    checks, as a process, what only a process shows."""
    return pretrain_cli("--config", TINY, *args)


def sample_cli(*args) -> subprocess.CompletedProcess:
    """python -m inference.sample ARGS for an input it refuses, in this process."""
    from inference import sample

    return run_cli(sample.main, *args, prog="inference.sample")


def start_pretrain(*args, launcher=None) -> subprocess.Popen:
    cmd = [*(launcher or [PY]), "training/pretrain.py", "--config", TINY, *args]
    return subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=cpu_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


class DiskSnapshot:
    """sha256 of every file under some directories; assert_unchanged: each one is still there, unchanged
    (new files are allowed: a refusal may leave an empty run.lock in a fresh out_dir)."""

    def __init__(self, *roots):
        self.roots = [Path(r) for r in roots]
        self.before = self._hashes()

    def _hashes(self) -> dict:
        out = {}
        for root in self.roots:
            for p in sorted(root.rglob("*")) if root.is_dir() else []:
                if p.is_file():
                    out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
        return out

    def assert_unchanged(self):
        after = self._hashes()
        changed = [p for p, h in self.before.items() if after.get(p) != h]
        assert not changed, f"files that existed before changed or vanished: {changed}"


def assert_refused(proc: subprocess.CompletedProcess, problem: str, fix: str, snapshot: DiskSnapshot | None = None):
    """Non-zero exit, no traceback, the problem and the fix named (regexes), nothing existing changed."""
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, f"exit 0 for a bad input\n{out[-3000:]}"
    assert "Traceback" not in out, out[-4000:]
    assert re.search(problem, out, re.S | re.I), f"the problem ({problem!r}) is not named:\n{out[-3000:]}"
    assert re.search(fix, out, re.S | re.I), f"the fix ({fix!r}) is not named:\n{out[-3000:]}"
    if snapshot is not None:
        snapshot.assert_unchanged()


def wait_for(predicate, proc: subprocess.Popen | None = None, timeout=120.0, what="the condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the process ended (exit {proc.returncode}) before {what}:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def processes_with(text: str) -> list:
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(text in part for part in p.info["cmdline"] or []):
                found.append(p)
        except psutil.Error:
            pass
    return found


def stop_group(proc: subprocess.Popen):
    """The end of a test: nothing it started keeps running, whatever happened."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)


def plant_pickle(path: Path, marker: Path, key: str | None = None) -> None:
    """Replace a checkpoint file with a pickle that would create `marker` when loaded with weights_only=False."""
    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({key: RunsCode()} if key else RunsCode(), path)


def reseal(tag_dir: Path) -> None:
    """What an attacker who sends a whole directory does: a manifest (and `latest`) matching the planted file."""
    step = int(ckpt.TAG_RE.match(tag_dir.name).group(1))
    (tag_dir / ckpt.MANIFEST).unlink()
    ckpt.finalize(tag_dir.parent, tag_dir.name, step, keep=100)


def verified_checkpoint(out_dir: Path, step: int = 20) -> Path:
    """A verified tag dir written without an engine (side files, RNG state, manifest, `latest`): what the
    checks that decide whether a checkpoint may be loaded look at."""
    root = ckpt.ckpt_root(out_dir)
    tag_dir = root / ckpt.tag_for(step)
    ckpt.write_side_files(tag_dir, 0, {}, {}, {})
    ckpt.finalize(root, tag_dir.name, step, keep=100)
    return tag_dir


def earlier_run(out_dir: Path) -> Path:
    """What a finished run leaves in its out_dir, and beside it what is not the run's (launch.sh's log, the
    lock file, a user's notes)."""
    verified_checkpoint(out_dir)
    (out_dir / "export").mkdir()
    (out_dir / "export" / "config.json").write_text("{}\n")
    (out_dir / "metrics.jsonl").write_text('{"kind": "done", "step": 20}\n')
    (out_dir / "tb").mkdir()
    (out_dir / "tb" / "events.out").write_bytes(b"events")
    for name in ("train.log", "run.lock", "notes.txt"):
        (out_dir / name).write_text(f"{name}\n")
    return out_dir


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults_data")
    rng = random.Random(0)
    words = "thou art the sun and moon my lord good night sweet prince fair is foul and foul is fair".split()
    text = "\n".join(f"{rng.choice(['ROMEO', 'JULIET'])}:\n" + " ".join(rng.choice(words) for _ in range(7)) + ".\n"
                     for _ in range(800))
    (root / "verse.txt").write_text(text)
    prepare.main(["--source", str(root / "verse.txt"), "--tokenizer", "char", "--out", str(root / "char")])
    return root / "char"


@pytest.fixture(scope="module")
def finished_run(data, tmp_path_factory) -> Path:
    """A completed 20-step run (checkpoints at 10 and 20, export): the reference the faults are compared to."""
    out = tmp_path_factory.mktemp("faults_runs") / "finished"
    proc = pretrain("--data_dir", data, "--out_dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(finished_run, dst)
    return dst


def losses(out_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_records(out_dir, "train")}


# ============================================================================= 1. one run per out_dir
@pytest.mark.slow
def test_a_second_run_on_a_busy_out_dir_refuses_naming_the_first(data, tmp_path):
    out = tmp_path / "busy"
    first = start_pretrain("--data_dir", data, "--out_dir", out, "--max_iters=1000000", "--eval_interval=1000000",
                           "--checkpoint_interval=0")
    try:
        wait_for(lambda: len(read_records(out, "train")) >= 2, first, what="the first run's steps")
        # suspended (Ctrl-Z, a preempted job), the run still holds its out_dir, and trains on no core meanwhile
        os.killpg(first.pid, signal.SIGSTOP)
        # a second terminal, a re-submitted job: pretrain.py, launch.sh and the lock check all refuse
        second = refused("--data_dir", data, "--out_dir", out)
        assert_refused(second, rf"out_dir {out} is in use by another run: pid {first.pid} on host .*started",
                       r"kill -TERM %d.*--out_dir=NEW_DIR" % first.pid)
        script = run(["bash", "launch.sh"], CONFIG=TINY, OUT_DIR=str(out), DATA_DIR=str(data), SAMPLES="0")
        assert_refused(script, rf"in use by another run: pid {first.pid}", r"OUT_DIR=NEW_DIR")
        assert not (out / "train.log").exists()  # refused before its log could replace anything
        check = run([PY, "-m", "training.run_lock", out])
        assert_refused(check, rf"pid {first.pid}", r"--out_dir=NEW_DIR")
        os.killpg(first.pid, signal.SIGCONT)
        os.killpg(first.pid, signal.SIGTERM)
        first.wait(timeout=60)
    finally:
        stop_group(first)
    kinds = [r["kind"] for r in read_records(out)]
    assert kinds.count("config") == 1 and kinds[-1] == "stopped"  # only the first run ever wrote there
    assert (out / "run.lock").read_text() == ""  # released cleanly: the next run starts without a note


def test_a_new_run_over_an_earlier_one_is_refused_naming_the_ways_on(tmp_path):
    out = earlier_run(tmp_path / "run")
    snapshot = DiskSnapshot(out)
    with pytest.raises(OutDirHoldsARun, match=(
            rf"out_dir {out} holds an earlier run \(checkpoints step_000020 \(latest: step_000020\); an export in "
            rf"{out}/export; {out}/metrics\.jsonl\).*Either continue it with --resume, or train into another "
            rf"directory \(--out_dir=NEW_DIR; OUT_DIR=NEW_DIR for launch\.sh\), or .* start over with --overwrite")):
        claim_out_dir(out, resume=False, overwrite=False)
    snapshot.assert_unchanged()


def test_overwrite_removes_the_earlier_run_and_nothing_else(tmp_path):
    out = earlier_run(tmp_path / "run")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "kept").write_text("not the run's to delete")
    (out / "wandb").symlink_to(tmp_path / "elsewhere")
    said = []
    claim_out_dir(out, resume=False, overwrite=True, log=said.append)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "run.lock", "train.log"]
    assert (tmp_path / "elsewhere" / "kept").is_file()  # behind a link: the link goes, not the files
    assert said == [f"--overwrite: removing the earlier run in {out} (checkpoints step_000020 (latest: step_000020); "
                    f"an export in {out}/export; {out}/metrics.jsonl)"]


@pytest.mark.parametrize("layout, resume, overwrite, rank", [
    ("fresh", False, False, 0),   # nothing there: a new run starts
    ("only_a_lock", False, False, 0),  # what a refused first attempt leaves: still fresh
    ("earlier_run", True, False, 0),  # --resume continues it
    ("earlier_run", False, False, 1),  # only global rank 0 decides (and removes), as it holds the lock
])
def test_where_a_run_may_start_without_a_word(tmp_path, layout, resume, overwrite, rank):
    out = tmp_path / "run"
    out.mkdir()
    if layout == "only_a_lock":
        (out / "run.lock").write_text("")
    elif layout == "earlier_run":
        earlier_run(out)
    snapshot = DiskSnapshot(out)
    claim_out_dir(out, resume=resume, overwrite=overwrite, rank=rank, log=pytest.fail)
    snapshot.assert_unchanged()


def test_resume_and_overwrite_together_are_refused(tmp_path):
    out = earlier_run(tmp_path / "run")
    snapshot = DiskSnapshot(out)
    with pytest.raises(OutDirHoldsARun, match=r"--resume continues .* --overwrite discards it: give one of them"):
        claim_out_dir(out, resume=True, overwrite=True)
    snapshot.assert_unchanged()


@pytest.mark.slow
def test_pretrain_again_on_a_finished_run_is_refused_and_overwrite_starts_anew(data, run_copy):
    latest = run_copy / "ckpt" / ckpt.LATEST
    snapshot = DiskSnapshot(run_copy)
    again = refused("--data_dir", data, "--out_dir", run_copy)
    assert_refused(again, rf"holds an earlier run \(checkpoints step_000010, step_000020 \(latest: step_000020\)",
                   r"--resume.*--out_dir=NEW_DIR.*--overwrite", snapshot)
    assert latest.read_text() == "step_000020"  # never moved back to the new run's first save
    anew = pretrain("--data_dir", data, "--out_dir", run_copy, "--overwrite", "--max_iters=2")
    assert anew.returncode == 0, anew.stderr[-3000:]
    assert "--overwrite: removing the earlier run" in anew.stdout
    assert [r["kind"] for r in read_records(run_copy)].count("config") == 1  # one run in metrics.jsonl
    assert ckpt.list_tags(run_copy / "ckpt") == [(2, "step_000002")] and latest.read_text() == "step_000002"
    assert json.loads((run_copy / "export" / "config.json").read_text())["step"] == 2


@pytest.mark.slow
def test_launch_sh_again_continues_the_run_in_its_out_dir(data, run_copy):
    """`bash launch.sh` run a second time: the run it finished is resumed (no step to train), exported again
    and reported; nothing of the first run changes."""
    before = read_records(run_copy)
    proc = run(["bash", "launch.sh"], CONFIG=TINY, OUT_DIR=str(run_copy), DATA_DIR=str(data), NPROC="1", SAMPLES="0")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert f"== {run_copy} holds a run (checkpoint step_000020): continuing it with --resume" in proc.stdout
    after = read_records(run_copy)
    assert after[:len(before)] == before and [r["kind"] for r in after[len(before):]] == ["config", "resumed", "done"]
    assert (run_copy / "ckpt" / ckpt.LATEST).read_text() == "step_000020"
    assert "bash launch.sh" in (run_copy / "train.log").read_text()  # appended to, with a line per launch


# ============================================================================= 2. faults
@pytest.mark.slow
def test_sigkill_mid_save_keeps_the_last_good_checkpoint_and_resume_reproduces_the_losses(data, finished_run, tmp_path):
    """SIGKILL while a checkpoint is half written: `latest` still names a verified one, the torn tag is
    skipped, the dead run's lock is taken over with a note, and the resumed run ends with the losses of the
    uninterrupted one.

    A tiny checkpoint is written in milliseconds, too fast to catch by polling, so the test holds one save
    open: a FIFO where step 6's manifest goes through its temporary file. Opening a FIFO to write blocks
    until someone reads it, so the run stops inside `finalize` with every shard of step 6 on disk and no
    manifest, and stays there until the kill."""
    out = tmp_path / "killed"
    root = ckpt.ckpt_root(out)
    torn = root / ckpt.tag_for(6)
    torn.mkdir(parents=True)
    hold = torn / (ckpt.MANIFEST + ".tmp")
    os.mkfifo(hold)
    shards = {p.name for p in (ckpt.ckpt_root(finished_run) / ckpt.tag_for(20)).rglob("*") if p.is_file()} - {ckpt.MANIFEST}
    proc = start_pretrain("--data_dir", data, "--out_dir", out, "--checkpoint_interval=1")
    try:
        wait_for(lambda: shards <= {p.name for p in torn.rglob("*")}, proc, what="every file of step 6 on disk")
        assert not (torn / ckpt.MANIFEST).exists() and proc.poll() is None  # held before its manifest
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        stop_group(proc)
    hold.unlink()  # what a real crash leaves: the shards, no manifest
    found = ckpt.find_latest_good(out)
    assert found is not None and found.step == 5 and (root / ckpt.LATEST).read_text() == found.tag
    resumed = pretrain("--data_dir", data, "--out_dir", out, "--resume")
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-3000:]
    assert "ended without releasing it (killed?)" in output  # the stale lock, detected and taken over
    assert f"skipped checkpoint {torn.name}" in output
    assert read_records(out)[-1]["kind"] == "done"
    reference, now = losses(finished_run), losses(out)
    assert {s: now[s] for s in range(6, 21)} == {s: reference[s] for s in range(6, 21)}


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 700 KB tmpfs: room for one tiny checkpoint, not two. Needs root (mount)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a full disk is simulated with a small tmpfs, and mounting one needs root")
    where = tmp_path / "tmpfs"
    where.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(where)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.mark.slow
def test_a_full_disk_says_disk_full_keeps_the_last_checkpoint_and_resumes_once_there_is_room(data, finished_run, small_tmpfs):
    out = small_tmpfs / "run"
    full = pretrain("--data_dir", data, "--out_dir", out)
    assert_refused(full, rf"disk full: could not write checkpoint step_000020 to {out}/ckpt/step_000020 \(.* free of",
                   r"last verified checkpoint \(step_000010\) is intact.*Free some space.*--resume")
    assert ckpt.find_latest_good(out).tag == "step_000010" and (out / "ckpt" / "latest").read_text() == "step_000010"
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["kind"] for line in lines][-1] == "train"  # every line whole, none torn
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_tmpfs)], check=True)
    resumed = pretrain("--data_dir", data, "--out_dir", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(out) == losses(finished_run)


@pytest.mark.slow
def test_a_torn_last_metrics_record_is_skipped_by_readers_and_cut_off_by_a_resumed_run(data, run_copy):
    path = run_copy / "metrics.jsonl"
    whole = path.read_text()
    path.write_text(whole + '{"kind": "train", "step": 21, "lo')  # a writer killed mid-line
    assert read_records(run_copy) == [json.loads(line) for line in whole.splitlines()]
    last_kind = run([PY, "-c", "import sys; from common.jsonl import read_jsonl; print(read_jsonl(sys.argv[1])[-1]['kind'])",
                     path])  # what launch.sh runs, without importing torch
    assert last_kind.stdout.strip() == "done"
    resumed = pretrain("--data_dir", data, "--out_dir", run_copy, "--resume", "--max_iters=22")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "removed a torn last record" in resumed.stderr
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()][-1] == 22  # strict: every line parses


@pytest.mark.slow
def test_sigterm_to_launch_sh_alone_stops_every_rank_with_a_checkpoint(data, tmp_path):
    out = tmp_path / "launched"
    proc = subprocess.Popen(["bash", "launch.sh", "--eval_interval=1000000", "--checkpoint_interval=0"], cwd=REPO,
                            env=cpu_env(CONFIG=TINY, OUT_DIR=str(out), DATA_DIR=str(data), MAX_ITERS="1000000",
                                        SAMPLES="0", NPROC="2"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for(lambda: len(read_records(out, "train")) >= 3, proc, timeout=180, what="training steps")
        proc.send_signal(signal.SIGTERM)  # launch.sh only, as `kill <pid>` does
        output, _ = proc.communicate(timeout=90)
    finally:
        stop_group(proc)
    assert proc.returncode == 143, output[-3000:]
    assert "continue with: bash launch.sh --resume" in output
    stopped = read_records(out, "stopped")
    assert stopped and stopped[0]["reason"] == "SIGTERM", output[-3000:]
    assert ckpt.find_latest_good(out).tag == stopped[0]["checkpoint"]
    wait_for(lambda: not processes_with(str(out)), timeout=30, what="every rank to exit")


@pytest.mark.slow
def test_sigterm_to_the_deepspeed_launcher_alone_stops_its_ranks_with_a_checkpoint(data, tmp_path):
    """`kill <deepspeed pid>`: the launcher dies at once and forwards nothing; the ranks see their launcher
    gone and stop as on SIGTERM."""
    from common.ports import free_port

    out = tmp_path / "orphaned"
    proc = start_pretrain("--data_dir", data, "--out_dir", out, "--max_iters=1000000", "--eval_interval=1000000",
                          "--checkpoint_interval=0", launcher=[DEEPSPEED, "--num_gpus", "2", "--master_port", free_port()])
    try:
        wait_for(lambda: len(read_records(out, "train")) >= 3, proc, timeout=180, what="training steps")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        wait_for(lambda: not processes_with(str(out)), timeout=60, what="every rank to exit")
    finally:
        stop_group(proc)
    stopped = read_records(out, "stopped")
    assert stopped and stopped[0]["reason"].startswith("launcher gone")
    assert ckpt.find_latest_good(out).tag == stopped[0]["checkpoint"]


def test_a_new_run_removes_shm_buffers_of_dead_processes_only():
    """Three buffers named as DeepSpeed names them: one of a dead rank (old, mapped by nobody), one a live
    process maps, one just created. Starting pretrain.py removes the first only."""
    from training.shm_buffers import PREFIX, SHM_DIR

    if not SHM_DIR.is_dir():
        pytest.skip("no /dev/shm on this system")
    tag = f"127.0.0.254_{os.getpid()}"
    dead, live, young = (SHM_DIR / f"{PREFIX}_{os.getuid()}_{tag}_{r}" for r in range(3))
    holder = None
    try:
        for p in (dead, live, young):
            p.write_bytes(b"\0" * 4096)
        for p in (dead, live):
            os.utime(p, (time.time() - 3600,) * 2)
        holder = subprocess.Popen([PY, "-c", "import mmap, sys, time; f = open(sys.argv[1], 'r+b'); "
                                   "m = mmap.mmap(f.fileno(), 0); f.close(); print('mapped', flush=True); time.sleep(120)",
                                   str(live)], stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "mapped"
        proc = run([PY, "training/pretrain.py", "--help"])  # the clean-up runs when pretrain.py starts
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert re.search(rf"removed \d+ stale DeepSpeed buffer\(s\) of dead runs from {SHM_DIR}: .*{dead}", proc.stderr)
        assert not dead.exists() and live.exists() and young.exists()
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
        for p in (dead, live, young):
            p.unlink(missing_ok=True)


# ============================================================================= 3. files that would run code
def plant_universal_link(tag_dir: Path, elsewhere: Path, marker: Path) -> None:
    """A `universal/` that links to a folder of pickles, and the file that says the conversion is done: what
    DeepSpeed loads on a resume at another world size or ZeRO stage. The manifest needs no edit (extra
    files are not in it)."""
    (elsewhere / "zero").mkdir(parents=True)
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        plant_pickle(elsewhere / name, marker, key="module")
    (tag_dir / universal.UNIVERSAL).symlink_to(elsewhere)
    (tag_dir / "latest_universal").write_text(universal.UNIVERSAL)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["resume", "export", "sample", "resume_elsewhere_through_a_link"])
def test_a_planted_pickle_is_refused_and_never_run(data, run_copy, tmp_path, how):
    marker = tmp_path / "code_ran"
    tag_dir = run_copy / "ckpt" / "step_000020"
    problem = r"refusing to load .*step_000020/(rng_rank0|mp_rank_00_model_states)\.pt.*GLOBAL posix\.system"
    if how == "resume":  # the RNG state a resumed run reads
        plant_pickle(tag_dir / "rng_rank0.pt", marker)
    elif how == "resume_elsewhere_through_a_link":
        plant_universal_link(tag_dir, tmp_path / "elsewhere", marker)
        problem = rf"refusing to load {tag_dir}: universal is a symbolic link \(to {tmp_path / 'elsewhere'}\)"
    else:  # the model states DeepSpeed and the export read
        plant_pickle(tag_dir / "mp_rank_00_model_states.pt", marker, key="module")
    if how != "resume_elsewhere_through_a_link":
        reseal(tag_dir)
    shutil.rmtree(run_copy / "export")
    snapshot = DiskSnapshot(run_copy)
    if how == "resume":
        proc = pretrain("--data_dir", data, "--out_dir", run_copy, "--resume")
    elif how == "resume_elsewhere_through_a_link":  # another ZeRO stage: through the universal checkpoint
        proc = pretrain("--data_dir", data, "--out_dir", run_copy, "--resume", "--deepspeed_config",
                        "ds_configs/zero1.json")
    elif how == "export":  # in this process (test_exporting_a_directory_that_is_no_checkpoint_is_refused: a process)
        from training import export
        proc = run_cli(export.main, "--ckpt", run_copy, "--out", tmp_path / "exported", prog="training.export")
    else:  # inference consolidates a training checkpoint through the export first
        proc = sample_cli("--ckpt", run_copy, "--num_samples", "1", "--max_new_tokens", "4")
    assert_refused(proc, problem, r"never executes code.*export \(model\.safetensors", snapshot)
    assert not marker.exists()


@pytest.mark.parametrize("link", ["universal_folder_elsewhere", "shard_file_elsewhere", "file_within_the_checkpoint"])
def test_a_link_inside_a_checkpoint_is_refused_before_anything_is_unpickled(tmp_path, link):
    """Checkpoints never hold links, and the scan of a checkpoint's pickles does not follow linked folders:
    every link is refused by resume and export alike, wherever it leads."""
    from training.checkpointing.checkpointer import ResumePoint
    from training.export import resolve_tag_dir

    marker, elsewhere = tmp_path / "code_ran", tmp_path / "elsewhere"
    out = tmp_path / "run"
    tag_dir = verified_checkpoint(out)
    if link == "universal_folder_elsewhere":
        plant_universal_link(tag_dir, elsewhere, marker)
        name = "universal"
    elif link == "shard_file_elsewhere":
        elsewhere.mkdir()
        plant_pickle(elsewhere / "model_states.pt", marker, key="module")
        (tag_dir / "mp_rank_00_model_states.pt").symlink_to(elsewhere / "model_states.pt")
        reseal(tag_dir)  # the manifest hashes what the link leads to
        name = "mp_rank_00_model_states.pt"
    else:
        (tag_dir / "rng_rank1.pt").symlink_to(tag_dir / "rng_rank0.pt")
        reseal(tag_dir)
        name = "rng_rank1.pt"
    snapshot = DiskSnapshot(out)
    for decide in (ResumePoint.find, resolve_tag_dir):
        with pytest.raises(UnsafeCheckpoint, match=rf"refusing to load {tag_dir}: {name} is a symbolic link "
                                                        rf"\(to .*\)\. Checkpoints never hold links.*cp -rL"):
            decide(out)
    snapshot.assert_unchanged()
    assert not marker.exists()


def test_a_gpt2_dir_with_a_pickle_that_runs_code_is_refused_plainly(gpt2_variants, tmp_path):
    """transformers reads pytorch_model.bin with weights_only=True, so the code never runs; the refusal is a
    message (a ValueError every command prints), not an UnpicklingError traceback."""
    from models.gpt import GPT

    marker, hf_dir = tmp_path / "code_ran", tmp_path / "hf"
    shutil.copytree(gpt2_variants["standard"], hf_dir)
    (hf_dir / "model.safetensors").unlink()
    plant_pickle(hf_dir / "pytorch_model.bin", marker, key="transformer.wte.weight")
    with pytest.raises(ValueError, match=r"refusing to load GPT-2 weights from .*pytorch_model\.bin.*GLOBAL "
                                         r"posix\.system.*never executes code.*model\.safetensors"):
        GPT.from_pretrained(str(hf_dir))
    assert not marker.exists()


def test_rng_state_in_a_checkpoint_is_plain_tensors(tmp_path):
    ckpt.write_side_files(tmp_path, 0, {}, {}, {})
    assert torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "rng_rank0.pt") == []


# ============================================================================= 4. bad inputs
BAD_DS_JSON = {
    "stage_7": ('{"zero_optimization": {"stage": 7}}', r"zero_optimization\.stage=7.*stages are 0, 1, 2 and 3"),
    "top_level_array": ('[{"zero_optimization": {"stage": 2}}]', r"must hold one JSON object .* not a list"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BAD_DS_JSON))
def test_a_bad_deepspeed_json_is_refused_naming_the_setting(data, run_copy, tmp_path, case):
    text, problem = BAD_DS_JSON[case]
    path = tmp_path / "ds.json"
    path.write_text(text)
    snapshot = DiskSnapshot(run_copy, data)
    proc = refused("--data_dir", data, "--out_dir", run_copy, "--deepspeed_config", path)
    assert_refused(proc, rf"{path}.*{problem}", r"ds_configs/zero0\.json", snapshot)


BAD_CONFIGS = {  # file name, bytes, the problem named, the fix named
    "json_array": ("c.json", b'[{"max_iters": 5}]', r"c\.json must hold a table of config keys.*not list",
                   r'\{"max_iters": 100\}'),
    "model_small": ("c.json", b'{"model": "small"}', r"model is a table of GPTConfig keys, got 'small'",
                    r'set its keys one by one.*--model\.\w+='),
    "toml_syntax": ("c.toml", b"max_iters = \n", r"c\.toml is not valid TOML", r"line 1, column 13"),
    "not_utf8": ("c.json", b'{"out_dir": "caf\xe9"}', r"c\.json is not UTF-8 text \(byte 0xe9", r"save it as UTF-8"),
    "unknown_key": ("c.json", b'{"max_iter": 5}', r"unknown config key.*max_iter", r"known keys: .*max_iters"),
    "wrong_type": ("c.json", b'{"max_iters": "many"}', r"max_iters: expected int", r"got 'many'"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_a_bad_training_config_is_refused_naming_the_file_or_key(data, tmp_path, case):
    name, content, problem, fix = BAD_CONFIGS[case]
    path = tmp_path / name
    path.write_bytes(content)
    snapshot = DiskSnapshot(data, tmp_path)
    proc = pretrain_cli("--config", path, "--data_dir", data, "--out_dir", tmp_path / "out")
    assert_refused(proc, problem, fix, snapshot)


def test_launch_sh_refuses_a_bad_config_before_starting_anything(tmp_path):
    path = tmp_path / "c.json"
    path.write_text("[]")
    proc = run(["bash", "launch.sh"], CONFIG=str(path), OUT_DIR=str(tmp_path / "out"), SAMPLES="0")
    assert_refused(proc, rf"CONFIG={path}: {path} must hold a table of config keys", r"table of config keys")
    assert proc.returncode == 2 and not (tmp_path / "out").exists()


def test_a_bad_input_exits_1_with_one_line_and_no_traceback(tmp_path):
    """The one refusal run as a process (the others call pretrain.py in this process): the exit status,
    and stderr that is the one line of the message, no traceback, no warning before it."""
    proc = run([PY, "training/pretrain.py", "--config", tmp_path / "nope.json"])
    assert_refused(proc, r"config file .*nope\.json does not exist", r"nope\.json")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == f"error: config file {tmp_path / 'nope.json'} does not exist\n"


def test_fsdp_with_a_deepspeed_json_is_refused(data, tmp_path):
    proc = refused("--data_dir", data, "--out_dir", tmp_path / "o", "--engine=fsdp", "--deepspeed_config",
                    "ds_configs/zero2.json")
    assert_refused(proc, r"--deepspeed_config=ds_configs/zero2\.json is for engine=deepspeed", r"drop it")


def test_missing_data_names_the_prepare_command(tmp_path):
    proc = refused("--data_dir", tmp_path / "nowhere", "--out_dir", tmp_path / "o")
    assert_refused(proc, rf"data directory {tmp_path / 'nowhere'} does not exist",
                   rf"python -m training\.prepare .*--out {tmp_path / 'nowhere'}")


def test_data_of_another_tokenizer_is_refused(data, tmp_path):
    snapshot = DiskSnapshot(data)
    proc = refused("--data_dir", data, "--out_dir", tmp_path / "o", "--tokenizer=gpt2")
    assert_refused(proc, r"tokenizer mismatch.*prepared with tokenizer 'char'", r"--tokenizer gpt2 --out NEW_DIR",
                   snapshot)


def test_a_context_longer_than_the_data_is_refused(data, tmp_path):
    proc = refused("--data_dir", data, "--out_dir", tmp_path / "o", "--model.block_size=100000")
    assert_refused(proc, r"fewer than one training window", r"smaller block_size")


@pytest.fixture
def data_copy(data, tmp_path) -> Path:
    dst = tmp_path / "data"
    shutil.copytree(data, dst)
    return dst


def test_the_suggested_fix_for_a_damaged_dataset_is_what_it_was_prepared_from(data_copy, tmp_path):
    (data_copy / "val.bin").unlink()
    meta = json.loads((data_copy / "meta.json").read_text())
    snapshot = DiskSnapshot(data_copy)
    proc = refused("--data_dir", data_copy, "--out_dir", tmp_path / "o")
    fix = rf"python -m training\.prepare --source {re.escape(meta['source'])} --tokenizer char --out {data_copy} --overwrite"
    assert_refused(proc, r"val\.bin is missing", fix, snapshot)
    # and the command it names re-creates the dataset
    from training import prepare
    from training.data import load_meta, verify_dataset

    prepare.main(shlex.split(re.search(fix, proc.stderr).group(0))[3:])
    verify_dataset(load_meta(data_copy))


def test_token_ids_outside_the_vocabulary_are_caught_on_load(data_copy, tmp_path):
    with open(data_copy / "train.bin", "r+b") as f:
        f.seek(2 * 1234)
        f.write((300).to_bytes(2, "little"))  # uint16 id 300 in a 31-id vocabulary
    snapshot = DiskSnapshot(data_copy)
    proc = refused("--data_dir", data_copy, "--out_dir", tmp_path / "o")
    assert_refused(proc, r"train\.bin holds token id 300 at position 1,234, outside the vocabulary",
                   r"Re-create it: python -m training\.prepare --source .* --tokenizer char", snapshot)


def test_a_changed_dataset_fails_its_sha256_with_verify(data_copy, tmp_path):
    with open(data_copy / "train.bin", "r+b") as f:  # swap two tokens: sizes and ids still look fine
        a, b = f.read(2), f.read(2)
        f.seek(0)
        f.write(b + a)
    snapshot = DiskSnapshot(data_copy)
    problem, fix = r"train\.bin has sha256 \w+\.\.\., meta\.json recorded", r"Re-create it: python -m training\.prepare"
    assert_refused(refused("--data_dir", data_copy, "--out_dir", tmp_path / "o", "--verify_data"), problem, fix, snapshot)
    # prepare --verify says the same (in this process; test_data.py runs prepare's bad input as a process)
    with pytest.raises(CorruptData) as refusal:
        prepare.main(["--verify", "--out", str(data_copy)])
    assert re.search(problem, str(refusal.value)) and re.search(fix, str(refusal.value)), refusal.value
    snapshot.assert_unchanged()


def test_prepare_verify_passes_an_intact_dataset(data, capsys):
    prepare.main(["--verify", "--out", str(data)])
    assert "OK" in capsys.readouterr().out


def test_resume_without_a_checkpoint_is_refused(data, tmp_path):
    proc = refused("--data_dir", data, "--out_dir", tmp_path / "empty", "--resume")
    assert_refused(proc, rf"--resume: no checkpoint in {tmp_path / 'empty'}", r"start without --resume")


@pytest.mark.slow
def test_resume_on_data_of_another_tokenizer_names_both_and_the_data_dir_to_use(data, run_copy, tmp_path):
    """Another char corpus pads to the same embedding rows, so nothing else would notice that its ids mean
    other characters."""
    (tmp_path / "other.txt").write_text("0123456789 abcdefghij\n" * 400)
    other = tmp_path / "other_char"
    assert run([PY, "-m", "training.prepare", "--source", tmp_path / "other.txt", "--tokenizer", "char",
                "--out", other]).returncode == 0
    snapshot = DiskSnapshot(run_copy)
    proc = refused("--data_dir", other, "--out_dir", run_copy, "--resume")
    assert_refused(proc, r"trained on data tokenized with 'char'.*ids mean other things",
                   rf"Resume with --data_dir={re.escape(str(data))}.*new --out_dir", snapshot)


@pytest.mark.slow
def test_an_over_long_prompt_names_the_prompt(finished_run, tmp_path):
    proc = sample_cli("--ckpt", finished_run / "export", "--start", "fair is foul " * 5, "--no_progress")
    assert_refused(proc, r"the --start prompt is 65 tokens long, but the model's context is 32 tokens",
                   r"shorten it to at most 31 tokens")


def test_sampling_a_missing_checkpoint_is_refused(tmp_path):
    """The one refusal of inference.sample run as a process (the others call its main in this process)."""
    proc = run([PY, "-m", "inference.sample", "--ckpt", tmp_path / "nope"])
    assert_refused(proc, r"checkpoint .*nope does not exist", r"a training run's out_dir, its export/ folder")


def test_exporting_a_directory_that_is_no_checkpoint_is_refused(tmp_path):
    """The one refusal of training.export run as a process (the others call its main in this process)."""
    (tmp_path / "x").mkdir()
    proc = run([PY, "-m", "training.export", "--ckpt", tmp_path / "x", "--out", tmp_path / "e"])
    assert_refused(proc, r"no complete checkpoint under", r"expected .*ckpt/step_\*")


def test_launch_sh_refuses_an_unknown_zero_stage(tmp_path):
    proc = run(["bash", "launch.sh"], ZERO="9", OUT_DIR=str(tmp_path / "o"), SAMPLES="0")
    assert_refused(proc, r"ZERO=9: DeepSpeed config 9 not found", r"ZERO=0\.\.3, 3_offload or a path")


def test_a_hostfile_of_one_unreachable_node_is_refused_before_deepspeed_tries_it(tmp_path, capsys):
    """DeepSpeed sshes to the first node of any hostfile, one node included (then starts the ranks here), and
    fails with a traceback; the check launch.sh runs first names the node and the command to try.
    127.0.0.9 runs no sshd."""
    from training import hostfile

    (tmp_path / "hosts").write_text("127.0.0.9 slots=2\n")
    assert hostfile.main([str(tmp_path / "hosts")]) == 2
    err = capsys.readouterr().err
    assert "1 node(s) of the hostfile cannot be reached" in err and "127.0.0.9:" in err, err
    assert "ssh -o BatchMode=yes 127.0.0.9 true" in err


def test_a_full_disk_at_the_export_is_said_to_be_a_full_disk(small_tmpfs):
    """safetensors reports ENOSPC in its own exception type, with the OS's words: the final export of a run
    then stops with the disk-full message (naming the checkpoint that is complete), not a traceback."""
    from common.disk import is_disk_full
    from tiny_models import export_tiny

    free = shutil.disk_usage(small_tmpfs).free
    (small_tmpfs / "filler").write_bytes(bytes(free - (32 << 10)))  # 32 KB left; the tiny model needs ~110 KB
    with pytest.raises(Exception) as raised:
        export_tiny(small_tmpfs / "export")
    assert is_disk_full(raised.value, small_tmpfs / "export"), repr(raised.value)


def test_init_from_gpt2_onto_char_data_names_the_tokenizer_before_any_shape(gpt2_variants):
    """The run states bias=false (tiny_test.json does) and GPT-2 has biases; but its weights are of no use on
    other token ids at all, which is the problem to name first."""
    from models.gpt import GPTConfig
    from training.init_from import source_for_run

    model = GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32, bias=False)
    with pytest.raises(ValueError, match=r"GPT-2 reads GPT-2 BPE ids.*prepared with the 'char' tokenizer"):
        source_for_run(str(gpt2_variants["standard"]), model, {"model.bias"}, {"tokenizer": "char", "vocab_size": 31},
                       "data/char")


# ----------------------------------------------------------------------------- GPT-2 variants we cannot reproduce
GPT2_VARIANTS = {
    "relu": ({"activation_function": "relu"}, r"activation_function='relu'"),
    "layer_norm_epsilon": ({"layer_norm_epsilon": 1e-6}, r"layer_norm_epsilon=1e-06"),
    "unscaled_attention": ({"scale_attn_weights": False}, r"scale_attn_weights=False"),
    "scale_by_layer": ({"scale_attn_by_inverse_layer_idx": True}, r"scale_attn_by_inverse_layer_idx=True"),
    "untied_head": ({"tie_word_embeddings": False}, r"untied output layer"),
}


@pytest.fixture(scope="module")
def gpt2_variants(tmp_path_factory) -> dict[str, Path]:
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("gpt2_variants")
    out = {}
    for name, (settings, _) in [("standard", ({}, "")), *GPT2_VARIANTS.items()]:
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(n_positions=32, n_embd=32, n_layer=1, n_head=2, vocab_size=50257, **settings)) \
            .save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.mark.parametrize("variant", sorted(GPT2_VARIANTS))
def test_from_pretrained_refuses_a_gpt2_variant_naming_the_setting(gpt2_variants, variant):
    from models.gpt import GPT

    with pytest.raises(ValueError, match=rf"cannot be reproduced here.*{GPT2_VARIANTS[variant][1]}.*transformers itself"):
        GPT.from_pretrained(str(gpt2_variants[variant]))


def test_from_pretrained_loads_a_standard_gpt2(gpt2_variants):
    from models.gpt import GPT
    from transformers import GPT2LMHeadModel

    x = torch.randint(0, 50257, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(GPT.from_pretrained(str(gpt2_variants["standard"])).eval()(x),
                                   GPT2LMHeadModel.from_pretrained(gpt2_variants["standard"]).eval()(x).logits,
                                   rtol=1e-5, atol=1e-5)


GPT2_DAMAGE = {  # what is done to model.safetensors, and the tensors the refusal names
    "missing": ("transformer.h.0.mlp.c_fc.weight", r"missing \(transformers would fill them with random values\): "
                r"\['transformer\.h\.0\.mlp\.c_fc\.weight'\]"),
    "unexpected": ("transformer.h.0.mlp.extra.weight", r"unexpected: \['transformer\.h\.0\.mlp\.extra\.weight'\]"),
}


@pytest.mark.parametrize("damage", sorted(GPT2_DAMAGE))
def test_a_gpt2_dir_whose_tensors_do_not_match_its_config_is_refused_naming_them(gpt2_variants, tmp_path, damage):
    from safetensors.torch import load_file, save_file

    from models.gpt import GPT

    hf_dir = tmp_path / "hf"
    shutil.copytree(gpt2_variants["standard"], hf_dir)
    tensors = load_file(hf_dir / "model.safetensors")
    key, named = GPT2_DAMAGE[damage]
    if damage == "missing":
        del tensors[key]
    else:
        tensors[key] = torch.zeros(2)
    save_file(tensors, hf_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{hf_dir}: the GPT-2 weights do not match its config\.json; "
                                         rf"tensors {named}"):
        GPT.from_pretrained(str(hf_dir))


def test_sampling_a_gpt2_variant_exits_with_the_setting_named(gpt2_variants):
    proc = sample_cli("--init_from", gpt2_variants["relu"], "--max_new_tokens", "2")
    assert_refused(proc, r"activation_function='relu'", r"transformers itself")


# ============================================================================= 5. the AR loss counts real tokens only
def test_ar_loss_puts_no_mass_on_mask_and_padding_rows_so_it_equals_the_hf_export(tmp_path):
    """An AR model's embedding has rows past the tokenizer's ids (MASK, padding to a multiple of 64); the
    exported Hugging Face model has only the real ones. Both losses agree, and the extra rows carry no
    probability: making their logits huge changes nothing."""
    from transformers import GPT2LMHeadModel

    from models.diffusion import ObjectiveConfig, compute_loss
    from models.gpt import GPT, GPTConfig
    from models.tokenizer import get_tokenizer
    from models.weights import save_consolidated
    from training.hf_export import export_to_hf

    tok = get_tokenizer("gpt2")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=50304, n_layer=1, n_head=2, n_embd=32)).eval()
    save_consolidated(model.state_dict(), {"model": model.config.to_dict(), "objective": {"name": "ar"},
                                           "tokenizer": tok.to_meta(), "mask_id": tok.mask_id, "eot_id": tok.eot_id},
                      tmp_path / "model")
    export_to_hf(tmp_path / "model", tmp_path / "hf")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, 50257, (2, 17))
    with torch.no_grad():
        ours = compute_loss(model, x[:, :-1], x[:, 1:], ObjectiveConfig(name="ar"), tok.mask_id, seed=0)
        theirs = hf(x, labels=x).loss
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        model.lm_head.weight[tok.mask_id:] = 10.0  # the MASK and padding rows (tied to the embedding)
        model.transformer.wte.weight[tok.mask_id:] = 10.0
        again = compute_loss(model, x[:, :-1], x[:, 1:], ObjectiveConfig(name="ar"), tok.mask_id, seed=0)
    torch.testing.assert_close(again, ours)
