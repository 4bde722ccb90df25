"""DeepSpeed hostfiles: read one, check it before a multi-node launch, and tell a run that was meant to be
multi-node but is not.

    python -m training.hostfile hosts               # parse, then ssh to every node (what launch.sh runs first)
    python -m training.hostfile hosts --num_gpus 2  # ... and check that every node's slots say 2

A hostfile has one node per line, `HOST slots=N` (`#` comments and blank lines allowed), as the DeepSpeed
launcher reads it. The launcher itself only warns about a missing file (and then trains on this machine
alone), and only tries ssh on the first node, with a traceback when it fails (also for a hostfile of one
node, whose ranks it then starts here); these checks fail early instead, naming the file, the line or the
node and the command that shows what is wrong.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

LINE_RE = re.compile(r"^(\S+)\s+slots=(\d+)\s*(#.*)?$")


def parse(path) -> dict[str, int]:
    """{host: slots} in file order; ValueError naming the file and the line for anything else."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"hostfile {path} does not exist (a typo?). The DeepSpeed launcher would train on this "
                         f"machine alone; write one line per node: 'HOST slots=N'")
    hosts: dict[str, int] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = LINE_RE.match(line)
        if not m:
            raise ValueError(f"hostfile {path}, line {number}: {raw!r} is not 'HOST slots=N' (e.g. 'node0 slots=8')")
        host, slots = m.group(1), int(m.group(2))
        if host in hosts:
            raise ValueError(f"hostfile {path}, line {number}: {host} is listed twice")
        if slots < 1:
            raise ValueError(f"hostfile {path}, line {number}: {host} has slots={slots}; every node needs >= 1")
        hosts[host] = slots
    if not hosts:
        raise ValueError(f"hostfile {path} lists no node (one line per node: 'HOST slots=N')")
    return hosts


def check_slots(hosts: dict[str, int], num_gpus: int, path) -> None:
    """ValueError when --num_gpus (launch.sh: NPROC) disagrees with a node's slots: DeepSpeed would start
    num_gpus ranks on every node whatever the file says."""
    wrong = {h: s for h, s in hosts.items() if s != num_gpus}
    if wrong:
        listed = ", ".join(f"{h} slots={s}" for h, s in wrong.items())
        raise ValueError(f"--num_gpus {num_gpus} (NPROC) disagrees with hostfile {path} ({listed}): DeepSpeed would "
                         f"start {num_gpus} rank(s) on every node. Drop NPROC / --num_gpus to use the slots, or fix the file.")


def check_reachable(hosts, timeout_s: int = 10) -> None:
    """RuntimeError naming every node that `ssh NODE true` (no password, as pdsh runs it) cannot reach."""
    failed = []
    for host in hosts:
        try:
            proc = subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={timeout_s}", host, "true"],
                                  capture_output=True, text=True)
        except FileNotFoundError:
            raise RuntimeError("a hostfile launch reaches every node by ssh (pdsh), and this machine has no ssh "
                               "client: install OpenSSH (apt-get install openssh-client)") from None
        if proc.returncode != 0:
            failed.append((host, (proc.stderr.strip().splitlines() or ["no error text"])[-1]))
    if failed:
        lines = "\n".join(f"  {host}: {err}" for host, err in failed)
        raise RuntimeError(f"{len(failed)} node(s) of the hostfile cannot be reached by passwordless ssh:\n{lines}\n"
                           f"Check each by hand with: ssh -o BatchMode=yes {failed[0][0]} true   (it must print "
                           f"nothing and ask for nothing; set up keys with ssh-copy-id, and ~/.ssh/config for ports)")


@dataclass
class LaunchInfo:
    """What the launcher of this rank was given, as far as a rank can tell."""
    hostfile: str | None  # HOSTFILE (launch.sh), or --hostfile of the deepspeed command above this process
    nodes: int  # nodes that joined (CROSS_SIZE, set by DeepSpeed's launch; torchrun: GROUP_WORLD_SIZE)


def launch_info() -> LaunchInfo:
    env = os.environ
    nodes = int(env.get("CROSS_SIZE") or env.get("GROUP_WORLD_SIZE") or 1)
    hostfile = env.get("HOSTFILE") or _hostfile_from_ancestors()
    return LaunchInfo(hostfile, nodes)


def _hostfile_from_ancestors(levels: int = 3) -> str | None:
    """--hostfile of a `deepspeed` command among this process's parents (Linux /proc; None elsewhere)."""
    pid = os.getppid()
    for _ in range(levels):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        args = [a.decode(errors="replace") for a in args]
        for i, a in enumerate(args):
            if a == "--hostfile" and i + 1 < len(args):
                return args[i + 1]
            if a.startswith("--hostfile="):
                return a.split("=", 1)[1]
        pid = int(stat.rsplit(")", 1)[1].split()[1])
        if pid <= 1:
            return None
    return None


def single_node_warning(info: LaunchInfo) -> str | None:
    """The warning for a run that was given a hostfile but runs on one node, or None."""
    if info.hostfile is None or info.nodes > 1:
        return None
    try:
        hosts = parse(info.hostfile)
    except ValueError as e:
        return f"WARNING: the launcher was given a hostfile, but only this node joined the run: {e}"
    if len(hosts) == 1:
        return (f"WARNING: hostfile {info.hostfile} lists one node ({next(iter(hosts))}): DeepSpeed then starts every "
                f"rank on THIS machine, whatever the host name says. List every node to train on several.")
    return (f"WARNING: hostfile {info.hostfile} lists {len(hosts)} nodes ({', '.join(hosts)}) but only one node "
            f"joined this run (an --include/--num_nodes filter?)")


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m training.hostfile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hostfile")
    parser.add_argument("--num_gpus", type=int, default=None, help="ranks per node the launch asks for (NPROC)")
    parser.add_argument("--no_ssh_check", action="store_true", help="parse only (Slurm-style launches)")
    args = parser.parse_args(argv)
    try:
        hosts = parse(args.hostfile)
        if args.num_gpus is not None:
            check_slots(hosts, args.num_gpus, args.hostfile)
        if not args.no_ssh_check:  # one node too: DeepSpeed runs `ssh NODE hostname` first for any hostfile
            check_reachable(hosts)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(" ".join(f"{h}:{s}" for h, s in hosts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
