"""A real two-node cluster on this one machine, for the multi-node tests (tests/test_multinode.py).

    node0 = 127.0.0.2, node1 = 127.0.0.3   (loopback addresses: no traffic leaves the machine)

Each node is an OpenSSH server (`/usr/sbin/sshd -D -f CONFIG`) listening on its own address, with a
throw-away host key and one throw-away authorized client key, all in a temporary directory. An `ssh`
wrapper first on PATH adds `-F SSH_CONFIG` (that port, that key, StrictHostKeyChecking no, no known_hosts
file), so DeepSpeed's reachability check and pdsh's ssh both reach the nodes, and nothing in ~/.ssh is
read or written. The environment the remote ranks need travels the DeepSpeed way, in a `.deepspeed_env`
file; DS_ENV_FILE points the launcher at it, so none is written into the repository or the home directory.

`stop()` ends every sshd it started and every process below them (remote ranks of a failed run
included), by pid, even when a test failed; a killed test process takes its sshd servers with it. Needs
`sshd` and `pdsh` (Debian: openssh-server, pdsh; .ci/run installs them); `missing_tools()` says what is
absent so a test can skip with the reason.
"""
from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

SSHD = "/usr/sbin/sshd"  # sshd re-executes itself and insists on an absolute path
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _end_with_parent() -> None:
    """In the child before exec: SIGTERM when the process that started it dies. stop() ends the servers of a
    test that fails; this ends them when the test process itself is killed (a cancelled run) and never
    reaches stop(). Linux keeps the setting across exec; elsewhere it is skipped."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
NODES = ("127.0.0.2", "127.0.0.3")


def missing_tools() -> str | None:
    """Why this machine cannot host the cluster, or None when it can."""
    if not os.path.isfile(SSHD):
        return f"{SSHD} not found (Debian: apt-get install openssh-server)"
    for tool in ("ssh", "ssh-keygen", "pdsh"):
        if shutil.which(tool) is None:
            return f"{tool} not found (Debian: apt-get install openssh-client pdsh)"
    try:
        free_port_on(NODES)
    except OSError as e:
        return f"cannot bind the loopback addresses {NODES}: {e}"
    return None


def free_port_on(addresses) -> int:
    """A TCP port that is free on every one of `addresses` (one sshd per address on the same port)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((addresses[0], 0))
            port = s.getsockname()[1]
        try:
            for addr in addresses:
                with socket.socket() as s:
                    s.bind((addr, port))
            return port
        except OSError:
            continue
    raise OSError(f"no port free on all of {addresses}")


def _descendants(pids: set[int]) -> set[int]:
    """Every live process below `pids` (from /proc's parent links)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), list(pids)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


class TwoNodeCluster:
    """Start with `with TwoNodeCluster(tmp_dir, env) as cluster:` (or start()/stop()).

    cluster.env      the environment a test launches with: PATH with the ssh wrapper, DS_ENV_FILE
    cluster.hostfile `127.0.0.2 slots=1` / `127.0.0.3 slots=1`
    cluster.ssh(node, command)   run a shell command on a node (what Slurm's srun would do)
    """

    def __init__(self, root: Path, env: dict, deepspeed_env: dict, slots: int = 1):
        self.root = Path(root)
        self.base_env = dict(env)
        self.deepspeed_env = deepspeed_env
        self.slots = slots
        self.nodes = NODES
        self.master_addr = NODES[0]
        self.user = getpass.getuser()
        self.procs: list[subprocess.Popen] = []
        # as on a real cluster, each node has its own host name where this machine allows it (root: a UTS
        # namespace per sshd); elsewhere both nodes share this machine's name
        self.own_hostnames = os.geteuid() == 0 and shutil.which("unshare") is not None and subprocess.run(
            ["unshare", "--uts", "true"], capture_output=True).returncode == 0

    # ------------------------------------------------------------------ setup
    def start(self) -> TwoNodeCluster:
        root = self.root
        root.mkdir(parents=True, exist_ok=True)
        for key in ("host_key", "client_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"diffusiongpt-test-{key}",
                            "-f", str(root / key)], check=True)
        shutil.copy(root / "client_key.pub", root / "authorized_keys")
        os.chmod(root / "authorized_keys", 0o600)
        if os.geteuid() == 0:  # a root sshd chroots its pre-auth child there; Debian's service creates it
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        self.port = free_port_on(self.nodes)
        try:
            for i, addr in enumerate(self.nodes):
                config = root / f"sshd_node{i}.conf"
                config.write_text("\n".join([
                    f"ListenAddress {addr}:{self.port}",
                    f"HostKey {root / 'host_key'}",
                    f"PidFile {root / f'sshd_node{i}.pid'}",
                    f"AuthorizedKeysFile {root / 'authorized_keys'}",
                    f"AllowUsers {self.user}",
                    "PubkeyAuthentication yes", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
                    "PermitRootLogin prohibit-password", "StrictModes no", "UsePAM no", "PrintMotd no",
                    "X11Forwarding no", "AllowTcpForwarding no", "LogLevel ERROR", ""]))
                log = open(root / f"sshd_node{i}.log", "w")
                cmd = [SSHD, "-D", "-e", "-f", str(config)]
                if self.own_hostnames:  # each node its own UTS namespace: `hostname` says node0 / node1
                    cmd = ["unshare", "--uts", "sh", "-c", f'hostname node{i} && exec "$0" "$@"', *cmd]
                self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                                   preexec_fn=_end_with_parent))
            ssh_config = root / "ssh_config"
            ssh_config.write_text("\n".join([
                f"Host {' '.join(self.nodes)}",
                f"  Port {self.port}", f"  User {self.user}", f"  IdentityFile {root / 'client_key'}",
                "  IdentitiesOnly yes", "  StrictHostKeyChecking no", "  UserKnownHostsFile /dev/null",
                "  GlobalKnownHostsFile /dev/null", "  BatchMode yes", "  ConnectTimeout 10", "  LogLevel ERROR", ""]))
            bin_dir = root / "bin"
            bin_dir.mkdir(exist_ok=True)
            real_ssh = shutil.which("ssh", path=self.base_env.get("PATH"))
            (bin_dir / "ssh").write_text(f'#!/bin/sh\nexec {real_ssh} -F {ssh_config} "$@"\n')
            os.chmod(bin_dir / "ssh", 0o755)
            (root / ".deepspeed_env").write_text("".join(f"{k}={v}\n" for k, v in self.deepspeed_env.items()))
            (root / "hosts").write_text("".join(f"{addr} slots={self.slots}\n" for addr in self.nodes))
            self.hostfile = root / "hosts"
            self.env = {**self.base_env, "PATH": f"{bin_dir}:{self.base_env.get('PATH', '')}",
                        "DS_ENV_FILE": str(root / ".deepspeed_env")}
            self._wait_until_reachable()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_reachable(self, timeout: float = 30) -> None:
        deadline = time.time() + timeout
        for i, addr in enumerate(self.nodes):
            while True:
                if self.procs[i].poll() is not None:
                    raise RuntimeError(f"sshd for {addr} exited: {(self.root / f'sshd_node{i}.log').read_text()}")
                proc = subprocess.run(["ssh", addr, "true"], env=self.env, capture_output=True, text=True)
                if proc.returncode == 0:
                    break
                if time.time() > deadline:
                    raise RuntimeError(f"ssh {addr} failed: {proc.stderr}")
                time.sleep(0.2)

    def ssh(self, node: str, command: str, **kwargs) -> subprocess.Popen:
        """`command` in a login-less shell on `node` (as srun would start it), output to the caller."""
        return subprocess.Popen(["ssh", node, command], env=self.env, **kwargs)

    # ------------------------------------------------------------------ teardown
    def stop(self) -> None:
        """Every sshd started here, and everything below them (sessions, remote ranks), by pid."""
        pids = {p.pid for p in self.procs if p.poll() is None}
        below = _descendants(pids)  # before the kill: orphans are re-parented and cannot be found after
        for pid in below | pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        deadline = time.time() + 10
        while below and time.time() < deadline:
            below = {pid for pid in below if os.path.exists(f"/proc/{pid}")}
            time.sleep(0.2)
        for pid in below:  # stragglers that outlived SIGTERM
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.procs = []

    def __enter__(self) -> TwoNodeCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
