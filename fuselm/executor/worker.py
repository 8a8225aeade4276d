"""A tensor-parallel rank other than 0: load its shard, then execute every step rank 0 broadcasts.

Rank 0 (the engine's process) schedules; each step it broadcasts the SchedulerOutput (plain data,
fuselm/core/scheduler_output.py) on the control group, and every rank runs the same forward on its
shard, taking part in the all-reduces and in the gather of the logits; only rank 0 samples. A
`None` step is the order to stop. A worker whose rank 0 dies sees its sockets close and exits.

Started as `python -m fuselm.executor.worker` with a pickled WorkerSpec on stdin (the mp backend;
a fresh interpreter, so the user's script is never re-imported) or inside a Ray actor.
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
import threading
import time
from dataclasses import dataclass

import torch

from fuselm.config import EngineConfig

logger = logging.getLogger("fuselm")


@dataclass
class WorkerSpec:
    """Everything a rank needs to join the group and build its runner (it pickles)."""

    config: EngineConfig
    rank: int
    world_size: int
    master_addr: str
    master_port: int
    device: str
    dtype: torch.dtype
    max_model_len: int
    eos_token_ids: list[int]
    vocab_size: int
    local_rank: int = 0
    cores: list[int] | None = None  # None: not pinned


@dataclass
class RankInfo:
    """What each rank reports once its runner is built (rank 0 collects them)."""

    rank: int
    pid: int
    host: str
    weight_bytes: int
    kv_bytes: int
    num_blocks: int
    plan: str


def rank_device(device: str, local_rank: int) -> str:
    """Rank i on a machine computes on its i-th GPU; on CPU every rank is 'cpu'."""
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        return f"cuda:{local_rank}"
    return device


def build_rank_runner(spec: WorkerSpec, group, weights: dict | None = None, model_config=None):
    """This rank's ModelRunner over its shard (read from the file unless rank 0 passes what it loaded)."""
    from fuselm.loader import load_model
    from fuselm.parallel.sharding import TensorShard
    from fuselm.runner.model_runner import ModelRunner

    config = spec.config
    if weights is None:
        loaded = load_model(config.model, spec.dtype, config.tokenizer, keep_quantized=config.quantization is None,
                            shard=TensorShard.of(config, spec.rank))
        weights, model_config = loaded.weights, loaded.config
    local = TensorShard.of(config, spec.rank).bind(model_config).local_config  # the shape of this rank's shard
    return ModelRunner(config, local, weights, str(group.device), spec.dtype, spec.max_model_len,
                       spec.eos_token_ids, parallel=group)


def describe_rank(runner, group) -> RankInfo:
    import socket

    return RankInfo(group.rank, os.getpid(), socket.gethostname(), runner.weight_bytes, runner.kv_bytes,
                    runner.num_blocks, runner.plan.summary())


def run_worker(spec: WorkerSpec) -> None:
    """The whole life of a worker rank; returns when rank 0 orders the stop."""
    from fuselm.parallel.cpu_affinity import pin
    from fuselm.parallel.group import destroy_group, init_group

    pin(spec.cores, spec.config.num_threads)
    torch.manual_seed(spec.config.seed)
    device = rank_device(spec.device, spec.local_rank)
    group = init_group(spec.rank, spec.world_size, spec.master_addr, spec.master_port, device, spec.vocab_size,
                       spec.local_rank)
    try:
        runner = build_rank_runner(spec, group)
        group.all_gather_object(describe_rank(runner, group))
        while (out := group.broadcast_object()) is not None:
            runner.execute(out)
        group.all_gather_object(group.stats)  # rank 0 reads every rank's collective times at shutdown
    finally:
        destroy_group()


def _exit_with_parent(parent_pid: int) -> None:
    """Leave as soon as the process that started this worker is gone (it cannot stop us any more)."""
    while True:
        if os.getppid() != parent_pid:
            os._exit(3)
        time.sleep(0.5)


def main() -> None:
    spec: WorkerSpec = pickle.load(sys.stdin.buffer)
    logging.basicConfig(level=os.environ.get("FUSELM_LOG_LEVEL", "WARNING"),
                        format=f"%(asctime)s rank {spec.rank} %(levelname)s %(message)s")
    parent = int(os.environ.get("FUSELM_PARENT_PID", os.getppid()))
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    run_worker(spec)


if __name__ == "__main__":  # run by its module name, so what it pickles names fuselm.executor.worker
    from fuselm.executor.worker import main as worker_main

    worker_main()
