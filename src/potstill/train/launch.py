"""Make `accelerate launch --cpu --num_processes N potstill run ...` start N processes.

Accelerate's launcher spreads CPU training over several processes only through `mpirun` (`--mpirun_hostfile`);
with plain `--cpu --num_processes N` it starts a single process and sets `MASTER_ADDR`/`MASTER_PORT`, but no
`WORLD_SIZE`, so the run would silently train alone. When potstill finds itself in that situation it replaces
itself (same PID, so Accelerate's launcher still waits on it) with `torch.distributed.run` starting N copies of
the same command, which then form a gloo process group through Accelerate as `--multi_gpu` on a CPU machine
does.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from accelerate.utils import str_to_bool

_FLAGS = ("--num_processes", "--num-processes")


def _launcher_argv(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # not Linux, or the parent is gone
        return []
    return [arg.decode(errors="replace") for arg in raw.split(b"\0") if arg]


def processes_requested(argv: list[str]) -> int:
    """The N of `--num_processes N` (or `--num_processes=N`) in an `accelerate launch` command line, else 1."""
    if not any(arg == "launch" or arg.endswith("accelerate.commands.launch") for arg in argv):
        return 1
    for i, arg in enumerate(argv):
        value = None
        if arg in _FLAGS and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(tuple(flag + "=" for flag in _FLAGS)):
            value = arg.split("=", 1)[1]
        if value is not None:
            return int(value) if value.isdigit() else 1
    return 1


def lone_cpu_launch_size(env: dict[str, str] | None = None, parent_argv: list[str] | None = None) -> int:
    """How many processes `accelerate launch --cpu` was asked for when it started only this one (else 1)."""
    env = dict(os.environ) if env is None else env
    if "WORLD_SIZE" in env or "MASTER_ADDR" not in env:
        return 1
    try:
        if not str_to_bool(env.get("ACCELERATE_USE_CPU", "False")):
            return 1
    except ValueError:
        return 1
    return processes_requested(_launcher_argv(os.getppid()) if parent_argv is None else parent_argv)


def relaunch_as_cpu_process_group() -> None:
    """If `accelerate launch --cpu --num_processes N` (N > 1) started only this process, exec torchrun for N."""
    n = lone_cpu_launch_size()
    if n <= 1:
        return
    print(f"potstill: `accelerate launch --cpu` started one process for --num_processes {n}; "
          f"starting {n} with torch.distributed.run (gloo)", file=sys.stderr, flush=True)
    args = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(n),
            "--master_addr", os.environ["MASTER_ADDR"], "--master_port", os.environ.get("MASTER_PORT", "29500"),
            "-m", "potstill", *sys.argv[1:]]
    os.execv(sys.executable, args)
