"""Data-parallel training across processes and machines, on PyTorch's own engine: torch.distributed + torchrun.

`edgekd build --nproc N` (one machine) and `torchrun --nnodes M --nproc-per-node N ... -m edgekd build` (several)
start one edgekd process per rank. Every rank runs the same pipeline; the engine asks rank 0 what to do with each
stage (cached / run / skip) and tells the others, so they agree by construction:

- training stages (teacher, assistant, distill, prune recovery, QAT) run on every rank with DistributedDataParallel:
  each rank takes its share of every global batch, the teacher runs on every rank without gradients;
- every other stage (data, exports, evaluation, benchmark, gate, report) runs on rank 0 only;
- only rank 0 writes into the run dir (outputs, checkpoints, reports); the others read it, so on several machines
  the run dir must be on storage every node sees (checked at start, with a clear error when it is not).

Backend: NCCL when the ranks have GPUs, gloo on CPU. `World` is the small interface the engine and the trainer use;
a single process is the world of size 1 and pays nothing.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

from edgekd.errors import EdgekdError

@dataclass
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: str = "cpu"  # "cuda:<local_rank>" when this rank has a GPU
    backend: str = ""  # "gloo" | "nccl" once the process group is up

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        return (f"{self.world_size} processes ({self.world_size // max(1, self.local_world_size)} node(s) x "
                f"{self.local_world_size}), backend {self.backend}, {self.device.split(':')[0]}")

    # ---- collectives (no-ops in a single process)

    def broadcast(self, obj: Any) -> Any:
        """rank 0's `obj` on every rank."""
        if not self.is_distributed:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj: Any) -> list:
        if not self.is_distributed:
            return [obj]
        import torch.distributed as dist

        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks of a list of floats (float64)."""
        if not self.is_distributed:
            return list(values)
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.cpu().tolist()

    def barrier(self) -> None:
        if self.is_distributed:
            import torch.distributed as dist

            dist.barrier()

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """fn() run on rank 0 only; its result on every rank. An EdgekdError it raises is raised on every rank."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except EdgekdError as exc:
                error = exc
        if self.is_distributed:
            result, error = self.broadcast((result, error))
        if error is not None:
            raise error
        return result


_WORLD = World()


def world() -> World:
    """This process's world: size 1 unless `init_from_env` joined a torchrun group."""
    return _WORLD


def launched_by_torchrun() -> bool:
    """torchrun's environment with WORLD_SIZE > 1: this process is one rank of a distributed build."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(timeout_minutes: float = 120.0) -> World:
    """Join the process group torchrun described in the environment; a World of size 1 when there is none.

    The timeout bounds how long ranks wait for each other in a collective: rank 0 alone runs the exports, evaluation
    and benchmark while the others wait at the next stage's broadcast, so it is generous.
    """
    global _WORLD
    if not launched_by_torchrun():
        _WORLD = World(device=_device(0))
        return _WORLD
    import torch
    import torch.distributed as dist

    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(size)))
    device = _device(local_rank)
    backend = "nccl" if device.startswith("cuda") and dist.is_nccl_available() else "gloo"
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))
    _WORLD = World(rank, size, local_rank, local_size, device, backend)
    _exit_with_launcher()
    return _WORLD


def _exit_with_launcher() -> None:
    """torch's launcher starts each rank in a session of its own, so a launcher killed outright (kill -9, OOM) would
    leave its ranks running, holding the run dir's lock. A rank therefore ends when its launcher is gone; what it
    finished stays (stage outputs are atomic, checkpoints are per epoch)."""
    import threading

    parent = os.getppid()

    def watch() -> None:
        import time

        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(3)

    threading.Thread(target=watch, name="edgekd-launcher-watch", daemon=True).start()


def leave_together(w: World) -> None:
    """The end of a distributed build's collective part: every rank leaves the process group at the same time (a
    rank tearing gloo down while another still talks to it can abort with 'terminate called without an active
    exception'), and the ranks other than 0 exit at once, successfully, with no C++ destructor left to race with.
    Rank 0 goes on alone (reports, exit code)."""
    if not w.is_distributed:
        return
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    if not w.is_main:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def shutdown() -> None:
    """Leave the process group if still in it (the error paths)."""
    if _WORLD.is_distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _device(local_rank: int) -> str:
    if os.environ.get("EDGEKD_DEVICE"):  # e.g. EDGEKD_DEVICE=cpu to keep a GPU machine on the CPU
        return os.environ["EDGEKD_DEVICE"]
    try:
        import torch

        if torch.cuda.is_available():
            return f"cuda:{local_rank % torch.cuda.device_count()}"
    except Exception:  # noqa: BLE001 - a broken CUDA install means CPU, not a crash
        pass
    return "cpu"


def check_shared_run_dir(w: World, run_dir: Path) -> None:
    """Every rank must see the files rank 0 writes into the run dir (one machine always does; several need shared
    storage). Rank 0 writes a token file; each rank reads it back; a rank that cannot fails the build clearly."""
    if not w.is_distributed:
        return
    token = w.broadcast(os.urandom(8).hex() if w.is_main else None)
    probe = Path(run_dir) / f".ranks-see-{token}"
    if w.is_main:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        probe.write_text(token)
    w.barrier()
    seen = probe.is_file() and probe.read_text() == token
    views = w.all_gather((seen, socket.gethostname()))
    w.barrier()
    if w.is_main:
        probe.unlink(missing_ok=True)
    blind = [f"rank {r} on {host}" for r, (ok, host) in enumerate(views) if not ok]
    if blind:
        raise EdgekdError(f"the run dir {run_dir} is not visible to every rank ({', '.join(blind[:3])} cannot read "
                          f"what rank 0 writes there); with several machines put --run-dir on storage all nodes share")


def launch_local(nproc: int, argv: list[str]) -> int:
    """Start `nproc` ranks of `python -m edgekd <argv>` on this machine through torch's elastic launcher (what
    torchrun --standalone does) and return the build's exit code: rank 0's, or the first failing rank's."""
    import logging

    # The launcher's chatter (and its own lines about a failed or interrupted worker) is not the user's business: the
    # ranks say what failed. torch.distributed.elastic sets each module logger's level from $LOGLEVEL at import.
    quiet = {"LOGLEVEL": os.environ.get("LOGLEVEL")}
    os.environ["LOGLEVEL"] = "CRITICAL"
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"edgekd-{os.getpid()}",
                          rdzv_backend="c10d", rdzv_endpoint=f"localhost:{_free_port()}", max_restarts=0,
                          monitor_interval=0.5, start_method="spawn")
    try:
        elastic_launch(config, sys.executable)("-m", "edgekd", *argv)
    except SignalException:  # Ctrl-C / SIGTERM: the launcher stopped the ranks, rank 0 said "interrupted"
        return 130
    except ChildFailedError as exc:
        # Each rank already printed its own one-line error; report the exit code the failing rank chose.
        rank, failure = exc.get_first_failure()
        code = failure.exitcode
        if code is None or code < 0:  # killed by a signal (torchrun stopping the others after one failed)
            print(f"edgekd: error: rank {rank} of the distributed build was stopped (exit {code})", file=sys.stderr)
            return 2
        return int(code)
    finally:
        if quiet["LOGLEVEL"] is None:
            os.environ.pop("LOGLEVEL", None)
        else:
            os.environ["LOGLEVEL"] = quiet["LOGLEVEL"]
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]
