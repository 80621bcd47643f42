"""`wft <stage> --nproc-per-node N [--nnodes M --node-rank R --master-addr A]`: the same
command under torchrun, which starts one process per GPU and restarts nothing itself (a
managed cloud job resumes the whole run from its last checkpoint instead)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from wftool.errors import WftError
from wftool.train.distributed import launched_by_torchrun


@dataclass(frozen=True)
class Processes:
    """Where this command's processes run (from the recipe's `distributed` section and the
    command line, which wins)."""

    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int = 29500

    @property
    def total(self) -> int:
        return self.nproc_per_node * self.nnodes

    def check(self) -> None:
        if not 0 <= self.node_rank < self.nnodes:
            raise WftError(f"--node-rank {self.node_rank} is outside 0 to {self.nnodes - 1} "
                           f"(--nnodes {self.nnodes})")
        if self.nnodes > 1 and not self.master_addr:
            raise WftError(f"--nnodes {self.nnodes} needs --master-addr: the address of node "
                           "rank 0, which every node connects to",
                           "e.g. --master-addr 10.0.0.1 on every node, each with its own "
                           "--node-rank")


def resolve_processes(recipe, nproc_per_node: int | None, nnodes: int | None,
                      node_rank: int | None, master_addr: str | None,
                      master_port: int | None) -> Processes:
    settings = recipe.distributed
    processes = Processes(
        nproc_per_node=nproc_per_node or settings.nproc_per_node,
        nnodes=nnodes or settings.nnodes,
        node_rank=node_rank or 0,
        master_addr=master_addr,
        master_port=master_port or settings.master_port,
    )
    processes.check()
    return processes


def needs_torchrun(processes: Processes) -> bool:
    """More than one process asked for, and this is not already one of them."""
    return processes.total > 1 and not launched_by_torchrun()


def torchrun_argv(processes: Processes, command: list[str]) -> list[str]:
    """The torchrun command line that runs `wft <command...>` on this node's processes."""
    argv = [sys.executable, "-m", "torch.distributed.run"]
    if processes.nnodes == 1 and not processes.master_addr:
        argv.append("--standalone")  # a free local port: several runs on one machine
    else:
        argv += ["--nnodes", str(processes.nnodes), "--node-rank", str(processes.node_rank),
                 "--master-addr", processes.master_addr,
                 "--master-port", str(processes.master_port)]
    argv += ["--nproc-per-node", str(processes.nproc_per_node), "-m", "wftool", *command]
    return argv


def run_torchrun(argv: list[str]) -> int:
    """Run torchrun in the foreground; its exit status is the command's, except that a
    rank which stopped on a user error (a clear message, exit 2) makes it 2, as one process
    would (Modal's app does not retry those)."""
    with tempfile.TemporaryDirectory() as tmp:
        marker = Path(tmp) / "user-error"
        env = {**os.environ, "WFT_USER_ERROR_FILE": str(marker)}
        code = subprocess.run(argv, env=env).returncode
        return 2 if code and marker.exists() else code


def describe(argv: list[str]) -> str:
    return shlex.join(argv)
