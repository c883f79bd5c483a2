"""A real multi-node Ray cluster on this machine for tests: one ``ray start`` per node, each with its own temp folder,
stopped by the ids of the processes it started (never ``ray stop``, which stops every Ray process on the host)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RayNodes:
    """A head (dashboard and Jobs API on 127.0.0.1) and worker nodes, each a ``ray start`` with ``num_cpus`` logical
    CPUs and one unit of a custom resource named after it (``node_a``, ``node_b``, ...), for placement checks.

    Token authentication is on (a fresh token): ``env`` is what a client needs (``RAY_AUTH_MODE=token``,
    ``RAY_AUTH_TOKEN``), and the nodes' PATH starts with this interpreter's folder, as nodes built from the lifelong
    image have ``lifelong`` on theirs.

    Attributes:
        address: the head's GCS address (HOST:PORT). jobs_address: ``http://127.0.0.1:PORT``. node_ids: Ray node ids,
            head first. env: the client environment (the process's own plus the token). temps: each node's temp
            folder.
    """

    num_nodes: int = 2
    num_cpus: int = 2
    address: str = ""
    jobs_address: str = ""
    node_ids: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    temps: list[Path] = field(default_factory=list)

    def start(self) -> RayNodes:
        """Start the head, then the worker nodes; return once every node is alive."""
        token = secrets.token_hex(16)
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        gcs, dashboard = free_port(), free_port()
        self.address, self.jobs_address = f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}"
        for i in range(self.num_nodes):
            temp = Path(tempfile.mkdtemp(prefix=f"ray-node{i}-", dir="/tmp"))
            self.temps.append(temp)
            role = ["--head", f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}"] \
                if i == 0 else [f"--address={self.address}"]
            # Every node its own agent ports: two nodes on one host would both take Ray's fixed defaults (52365).
            ports = [f"--{name}-port={free_port()}" for name in (
                "dashboard-agent-listen", "dashboard-agent-grpc", "runtime-env-agent", "metrics-export")]
            subprocess.run([RAY, "start", *role, *ports, f"--num-cpus={self.num_cpus}",
                            f"--resources={json.dumps({f'node_{chr(97 + i)}': 1})}", f"--temp-dir={temp}",
                            "--object-store-memory=200000000", "--disable-usage-stats"],
                           check=True, capture_output=True, env=self.env, timeout=120)
        nodes = json.loads(subprocess.run(
            [RAY, "list", "nodes", "--address", self.jobs_address, "--format", "json", "--detail"], check=True,
            capture_output=True, text=True, env=self.env, timeout=60).stdout)
        alive = [n for n in nodes if n["state"] == "ALIVE"]
        assert len(alive) == self.num_nodes, nodes
        self.node_ids = tuple(n["node_id"] for n in sorted(alive, key=lambda n: not n["is_head_node"]))
        return self

    def pids(self) -> list[int]:
        """This cluster's live processes (see :func:`processes_under`)."""
        return processes_under(self.temps)

    def stop(self) -> list[int]:
        """Stop this cluster's processes (:func:`stop_processes`), then remove its temp folders. Returns the ids
        still alive after that (none, normally; the folders are then kept)."""
        left = stop_processes(self.pids())
        if not left:
            for temp in self.temps:
                shutil.rmtree(temp, ignore_errors=True)
        return left


def processes_under(temps: list[Path]) -> list[int]:
    """The live processes of the Ray nodes started with these temp folders: those whose command line names one of
    them (GCS, raylets, dashboard, agents) and all their descendants (workers, whose titles Ray rewrites), read
    from Linux ``/proc``."""
    parents: dict[int, int] = {}
    roots = []
    marks = [str(t).encode() for t in temps]
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if any(m in (proc / "cmdline").read_bytes() for m in marks):
                roots.append(int(proc.name))
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
    mine, grew = set(roots), True
    while grew:
        before = len(mine)
        mine |= {pid for pid, parent in parents.items() if parent in mine}
        grew = len(mine) > before
    return sorted(mine)


def stop_processes(victims: list[int], grace_s: float = 3.0) -> list[int]:
    """SIGTERM to ``victims`` (collected once, before their children are re-parented), SIGKILL to those left after
    ``grace_s`` seconds (Ray's agents may ignore SIGTERM). Returns the ids still alive (zombies aside) after that."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in victims:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace_s
        while any(Path(f"/proc/{pid}").exists() and not _zombie(pid) for pid in victims) and time.time() < deadline:
            time.sleep(0.2)  # waiting for processes to exit, not synchronising a test
    return [pid for pid in victims if Path(f"/proc/{pid}").exists() and not _zombie(pid)]


def _zombie(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) == "Z"
    except OSError:
        return False
