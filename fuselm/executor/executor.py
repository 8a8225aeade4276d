"""Rank 0 of a tensor-parallel engine: what LLMEngine holds in place of its ModelRunner.

The engine's process is rank 0: it schedules, runs its own shard, and is the only rank that
samples. `TensorParallelExecutor` has the runner's interface (execute, num_blocks, weight_bytes,
...): each step it broadcasts the SchedulerOutput to the workers on the control group, then runs its
own runner, whose collectives meet the workers' in the forward pass.

Start-up: rank 0 has loaded its shard (the engine loads it with the rank-0 TensorShard); the
workers are started (mp_workers.py: local processes; ray_workers.py: Ray actors in a placement
group), everyone joins the process group, each loads its shard and builds its runner, the KV
block count is the smallest any rank's memory holds, and each rank reports its weight bytes and
execution plan.

Failure: a rank that dies makes rank 0's pending collective fail at once (its sockets close); a
rank that hangs makes it time out (COLLECTIVE_TIMEOUT_S). Either way, and when a worker is found dead
between steps, `execute` raises WorkerFailedError naming the rank and why (exit code, the tail of its
error output). The executor is then broken for good: every later step raises the same error.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import weakref

import torch

from fuselm.config import EngineConfig, ModelConfig
from fuselm.parallel.cpu_affinity import core_slices, pin
from fuselm.parallel.group import TensorParallelGroup, WorkerFailedError, destroy_group, init_group
from fuselm.executor.worker import RankInfo, WorkerSpec, build_rank_runner, describe_rank

logger = logging.getLogger("fuselm")

FAILURE_GRACE_S = 3.0  # after a collective fails, how long to wait for the worker's death to be seen


def free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def start_workers(config: EngineConfig):
    if config.distributed_executor_backend == "ray":
        from fuselm.executor.ray_workers import RayWorkers

        return RayWorkers(config)
    from fuselm.executor.mp_workers import ProcessWorkers

    return ProcessWorkers()


class _Lifecycle:
    """The executor's parts that shutting down needs (kept apart so a finalizer can run it)."""

    def __init__(self, workers) -> None:
        self.workers = workers
        self.group: TensorParallelGroup | None = None
        self.pinning = None
        self.failed: str | None = None
        self.closed = False
        self.rank_stats: list = []

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        healthy = self.failed is None and self.workers.failure() is None
        self.workers.expect_exit()
        if self.group is not None and healthy:
            try:
                self.group.broadcast_object(None)
                self.rank_stats = self.group.all_gather_object(self.group.stats)
            except Exception:  # a worker died meanwhile: nothing left to tell it
                pass
        self.workers.stop(timeout=10.0)
        destroy_group()
        if self.pinning is not None:
            self.pinning.restore()


class TensorParallelExecutor:
    """Rank 0's runner plus the workers (ranks 1..N-1): the ModelRunner interface over N processes."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig, weights: dict, device: str,
                 dtype: torch.dtype, max_model_len: int, eos_token_ids: list[int]) -> None:
        world = config.tensor_parallel_size
        workers = start_workers(config)
        self._life = life = _Lifecycle(workers)
        weakref.finalize(self, life.close)
        placement = workers.place(world)  # (local_rank, local ranks on its machine) of ranks 0..N-1
        address = workers.master_address()
        port = free_port(address)
        specs = []
        for rank in range(world):
            local_rank, local_world = placement[rank]
            slices = core_slices(local_world) if device == "cpu" else None
            specs.append(WorkerSpec(config, rank, world, address, port, device, dtype, max_model_len,
                                    list(eos_token_ids), model_config.vocab_size, local_rank,
                                    slices[local_rank] if slices else None))
        try:
            workers.start(specs[1:])
            life.pinning = pin(specs[0].cores, config.num_threads)
            life.group = group = self._join(specs[0])
            self.runner = build_rank_runner(specs[0], group, weights, model_config)
            self.ranks: list[RankInfo] = group.all_gather_object(describe_rank(self.runner, group))
        except Exception as exc:
            why = self._worker_failure()
            life.close()
            if why is not None:
                raise WorkerFailedError(f"tensor parallelism failed to start: {why}") from exc
            raise
        self.group = group
        for info in self.ranks:
            logger.info("tensor-parallel rank %d (pid %d on %s): weights %.1f MiB, KV cache %.1f MiB; %s",
                        info.rank, info.pid, info.host, info.weight_bytes / 2**20, info.kv_bytes / 2**20, info.plan)

    def _join(self, spec: WorkerSpec) -> TensorParallelGroup:
        """Join the rendezvous in a helper thread, watching the workers: one that dies while starting
        fails the start at once instead of after the rendezvous timeout."""
        result: dict = {}

        def join() -> None:
            try:
                result["group"] = init_group(0, spec.world_size, spec.master_addr, spec.master_port, spec.device,
                                             spec.vocab_size, spec.local_rank)
            except BaseException as exc:  # handed to the waiting thread
                result["error"] = exc

        thread = threading.Thread(target=join, name="fuselm-tp-rendezvous", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.1)
            why = self._life.workers.failure()
            if why is not None:
                raise WorkerFailedError(f"tensor parallelism failed to start: {why}")
        if "error" in result:
            raise result["error"]
        return result["group"]

    def _worker_failure(self, grace: float = FAILURE_GRACE_S) -> str | None:
        """Why a worker is gone, waiting up to `grace` seconds for its death to be noticed."""
        deadline = time.monotonic() + grace
        while True:
            why = self._life.workers.failure()
            if why is not None or time.monotonic() >= deadline:
                return why
            time.sleep(0.05)

    # ---- the runner interface -------------------------------------------------------------------

    def execute(self, out):
        life = self._life
        if life.failed is None:
            why = life.workers.failure()
            if why is not None:
                life.failed = why
        if life.failed is not None or life.closed:
            raise WorkerFailedError(f"the tensor-parallel engine cannot run: {life.failed or 'it is shut down'}")
        try:
            self.group.broadcast_object(out)
            return self.runner.execute(out)
        except Exception as exc:
            why = self._worker_failure()
            life.failed = why or f"a step failed on rank 0 and the ranks are out of step: {exc}"
            logger.error("tensor-parallel step failed: %s", life.failed)
            raise WorkerFailedError(f"the tensor-parallel engine failed: {life.failed}") from exc

    def shutdown(self) -> None:
        """Stop the workers and leave the process group (also run when the executor is collected)."""
        self._life.close()

    @property
    def failure(self) -> str | None:
        return self._life.failed

    @property
    def worker_pids(self) -> list[int]:
        return [info.pid for info in self.ranks[1:]]

    @property
    def rank_collective_stats(self) -> list:
        """Every rank's CollectiveStats, collected at shutdown (empty before)."""
        return self._life.rank_stats

    def __getattr__(self, name: str):
        # num_blocks, block_size, weight_bytes, kv_bytes, model, plan, ...: rank 0's runner's (every
        # rank's shard has the same shape)
        if name == "runner":
            raise AttributeError(name)
        return getattr(self.runner, name)
