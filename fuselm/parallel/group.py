"""The tensor-parallel process group: what a rank knows about the others and how it talks to them.

Two torch.distributed groups span the same ranks:
- the compute group (gloo on CPU, NCCL on CUDA) carries the collectives of the forward pass: the
  all-reduce after each row-parallel projection and the vocabulary-parallel embedding, and the
  gather of the LM head's logits to rank 0. It has a bounded timeout (COLLECTIVE_TIMEOUT_S): the
  ranks run the same work, so a rank that waits that long for the others waits for one that hangs;
- the control group (gloo, on CPU) carries rank 0's per-step broadcast of the SchedulerOutput and
  the start-up exchanges. Its timeout is unbounded because a worker waits there while the engine is
  idle; a rank that dies closes its sockets, which fails the others' pending operations at once.

Layers hold a TensorParallelGroup given to them at load (no global state): a process can hold a
tensor-parallel engine and a plain one side by side. A future expert-parallel MoE block takes the
same group. This module imports nothing of the runner or the engine.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

COLLECTIVE_TIMEOUT_S = 60.0  # the compute group's: longer than any skew between ranks in one step
_UNBOUNDED = datetime.timedelta(days=3650)


class WorkerFailedError(RuntimeError):
    """A tensor-parallel rank died or stopped answering: the engine cannot run another step.

    Raised out of LLMEngine.step (not turned into failed requests), so LLM.generate raises it and the
    server's engine thread stops (its requests fail, later ones get 503)."""


@dataclass
class CollectiveStats:
    """Time rank-local collectives took (waiting for slower ranks included), for the benchmark."""

    all_reduce_calls: int = 0
    all_reduce_seconds: float = 0.0
    all_reduce_bytes: int = 0
    gather_seconds: float = 0.0


@dataclass
class TensorParallelGroup:
    rank: int
    world_size: int
    device: torch.device
    vocab_size: int  # the model's real vocabulary; each rank's LM head holds a padded slice of it
    local_rank: int = 0  # among the ranks on this machine
    compute_group: object | None = None  # a torch.distributed ProcessGroup; None: the default group
    control_group: object | None = None
    stats: CollectiveStats = field(default_factory=CollectiveStats)

    @property
    def is_driver(self) -> bool:
        """Rank 0 runs the scheduler and samples; the others only compute their shards."""
        return self.rank == 0

    # ---- the forward pass (compute group) ------------------------------------------------------

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place; returns it."""
        t0 = time.perf_counter()
        dist.all_reduce(x, group=self.compute_group)
        s = self.stats
        s.all_reduce_calls += 1
        s.all_reduce_seconds += time.perf_counter() - t0
        s.all_reduce_bytes += x.numel() * x.element_size()
        return x

    def gather_columns(self, local: torch.Tensor) -> torch.Tensor | None:
        """Rank 0: every rank's `local` [S, n] side by side, [S, world_size * n]; other ranks: None."""
        t0 = time.perf_counter()
        local = local.contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world_size)] if self.is_driver else None
        dist.gather(local, parts, dst=0, group=self.compute_group)
        self.stats.gather_seconds += time.perf_counter() - t0
        return torch.cat(parts, dim=-1) if parts is not None else None

    # ---- steps and start-up (control group) ------------------------------------------------------

    def broadcast_object(self, obj: object = None) -> object:
        """Rank 0 sends `obj` (pickled) to every rank; every rank returns it."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.control_group)
        return box[0]

    def all_gather_object(self, obj: object) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.control_group)
        return out

    def min_over_ranks(self, value: int) -> int:
        """The smallest of every rank's `value` (e.g. the KV blocks each rank's memory holds)."""
        t = torch.tensor([value], dtype=torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control_group)
        return int(t.item())


def init_group(rank: int, world_size: int, master_addr: str, master_port: int, device: str, vocab_size: int,
               local_rank: int = 0, timeout_s: float = COLLECTIVE_TIMEOUT_S) -> TensorParallelGroup:
    """Join the ranks' rendezvous at master_addr:master_port (rank 0 serves it) and build both groups.

    Blocks until all `world_size` ranks have joined (at most `timeout_s`)."""
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialised in this process: another tensor-parallel "
                           "engine is still running here; shut it down (LLMEngine.shutdown) before starting one")
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
    control = dist.new_group(backend="gloo", timeout=_UNBOUNDED)
    dev = torch.device(device)
    return TensorParallelGroup(rank=rank, world_size=world_size, device=dev, vocab_size=vocab_size,
                               local_rank=local_rank, compute_group=None, control_group=control)


def destroy_group() -> None:
    """Leave torch.distributed (both groups); a later engine in this process may join a new one."""
    if dist.is_initialized():
        dist.destroy_process_group()
