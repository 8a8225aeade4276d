"""The `ray` backend: tensor-parallel ranks 1..N-1 as Ray actors, so the ranks may span machines.

The Ray cluster is the user's set-up (`ray start --head` on one machine, `ray start --address
HEAD:6379` on the others); fuselm connects to it with `ray.init()` (RAY_ADDRESS, or the cluster
running on this machine, or else a new local instance). The workers are placed by a placement group
of N-1 bundles of num_threads CPUs (one when unset), packed onto as few machines as have room; rank
0 is the engine's own process. Ranks on one machine split its cores as the mp backend does. Each
actor runs fuselm.executor.worker.run_worker; a thread waits on those calls, so an actor that dies
(or a call that raises) is logged at once and reported by `failure()`.
"""

from __future__ import annotations

import logging
import threading

from fuselm.config import EngineConfig
from fuselm.errors import InvalidConfigError

logger = logging.getLogger("fuselm")

PLACEMENT_TIMEOUT_S = 60.0


class RankActor:
    """The body of one worker actor (made a Ray actor class by RayWorkers)."""

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def run(self, spec) -> int:
        from fuselm.executor.worker import run_worker

        run_worker(spec)
        return spec.rank


class RayWorkers:
    def __init__(self, config: EngineConfig) -> None:
        try:
            import ray
        except ImportError:
            raise InvalidConfigError("distributed_executor_backend='ray' needs Ray: pip install 'ray>=2.9' (or use "
                                     "the default 'mp' backend on one machine)",
                                     option="distributed_executor_backend") from None
        self.ray = ray
        if not ray.is_initialized():
            ray.init(log_to_driver=True)
        self.cpus = config.num_threads or 1
        self.actors: list = []
        self.refs: list = []
        self.pg = None
        self.failed: str | None = None
        self.stopping = False

    def place(self, world_size: int) -> list[tuple[int, int]]:
        """Reserve the workers' bundles, start the actors; (local rank, ranks on that machine) per rank."""
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        ray = self.ray
        self.pg = placement_group([{"CPU": self.cpus}] * (world_size - 1), strategy="PACK")
        ready, _ = ray.wait([self.pg.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            raise InvalidConfigError(
                f"the Ray cluster has no room for {world_size - 1} tensor-parallel workers of {self.cpus} CPUs each "
                f"(ray status shows its resources); add machines or lower tensor_parallel_size / num_threads",
                option="tensor_parallel_size")
        actor_class = ray.remote(RankActor)
        self.actors = [actor_class.options(num_cpus=self.cpus, scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=self.pg, placement_group_bundle_index=i)).remote() for i in range(world_size - 1)]
        nodes = [ray.get_runtime_context().get_node_id()] + ray.get([a.node_id.remote() for a in self.actors])
        placement = []
        for rank, node in enumerate(nodes):
            placement.append((nodes[:rank].count(node), nodes.count(node)))
        return placement

    def master_address(self) -> str:
        return self.ray.util.get_node_ip_address()

    def start(self, specs: list) -> None:
        self.refs = [actor.run.remote(spec) for actor, spec in zip(self.actors, specs)]
        threading.Thread(target=self._watch, name="fuselm-tp-ray-watch", daemon=True).start()

    def _watch(self) -> None:
        ray = self.ray
        pending = list(self.refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=None)
            if self.stopping:
                return
            ref = done[0]
            rank = self.refs.index(ref) + 1
            try:
                ray.get(ref)
                why = "returned before it was told to stop"
            except Exception as exc:  # RayActorError (the actor died) or the worker's own exception
                lines = [line for line in str(exc).splitlines() if line.strip()]
                why = f"failed: {type(exc).__name__}: {' | '.join(lines[-3:])}"
            self.failed = f"rank {rank} (Ray actor) {why}"
            logger.error("tensor-parallel worker %s", self.failed)
            return

    def failure(self) -> str | None:
        return None if self.stopping else self.failed

    def expect_exit(self) -> None:
        self.stopping = True

    def stop(self, timeout: float) -> None:
        self.expect_exit()
        ray = self.ray
        if self.refs:
            ray.wait(self.refs, num_returns=len(self.refs), timeout=timeout)
        for actor in self.actors:
            ray.kill(actor)
        if self.pg is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.pg)
