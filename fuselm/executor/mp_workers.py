"""The `mp` backend: tensor-parallel ranks 1..N-1 as local processes.

Each worker is a fresh interpreter (`python -m fuselm.executor.worker`) reading its pickled
WorkerSpec from stdin, so the user's script is never re-imported (no `if __name__ == "__main__"`
guard is needed, unlike multiprocessing's spawn). Its stderr passes through to ours, and the last
lines are kept to say why it died. One thread per worker waits for it to exit: a worker that exits
before it is told to is a failure, logged at once and reported by `failure()`.
"""

from __future__ import annotations

import collections
import logging
import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path

logger = logging.getLogger("fuselm")

_ERROR_LINES = 12


class _Process:
    def __init__(self, spec) -> None:
        self.rank = spec.rank
        env = dict(os.environ, FUSELM_PARENT_PID=str(os.getpid()))
        root = str(Path(__file__).resolve().parents[2])  # fuselm importable even when run from a checkout
        env["PYTHONPATH"] = root + os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else root
        if spec.cores:  # OpenMP must not spin up more threads than the rank's cores before torch is told
            env["OMP_NUM_THREADS"] = str(spec.config.num_threads or len(spec.cores))
        self.proc = subprocess.Popen([sys.executable, "-m", "fuselm.executor.worker"], stdin=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env)
        self.tail: collections.deque[str] = collections.deque(maxlen=_ERROR_LINES)
        self.stopping = False
        self.exit_code: int | None = None
        self.proc.stdin.write(pickle.dumps(spec))
        self.proc.stdin.close()
        threading.Thread(target=self._relay_stderr, name=f"fuselm-tp-rank{self.rank}-stderr", daemon=True).start()
        self.exited = threading.Event()
        threading.Thread(target=self._wait, name=f"fuselm-tp-rank{self.rank}-watch", daemon=True).start()

    def _relay_stderr(self) -> None:
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace")
            self.tail.append(line.rstrip())
            sys.stderr.write(line)

    def _wait(self) -> None:
        self.exit_code = self.proc.wait()
        self.exited.set()
        if not self.stopping:
            logger.error("tensor-parallel worker %s", self.describe())

    def describe(self) -> str:
        code = self.exit_code
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        last = [line for line in self.tail if line.strip()]
        detail = f"; its last output: {' | '.join(last[-3:])}" if last else ""
        return f"rank {self.rank} (pid {self.proc.pid}) {how}{detail}"


class ProcessWorkers:
    def __init__(self) -> None:
        self.processes: list[_Process] = []

    def place(self, world_size: int) -> list[tuple[int, int]]:
        """All ranks on this machine: rank i is local rank i of world_size."""
        return [(rank, world_size) for rank in range(world_size)]

    def master_address(self) -> str:
        return "127.0.0.1"

    def start(self, specs: list) -> None:
        self.processes = [_Process(spec) for spec in specs]

    def failure(self) -> str | None:
        """A description of a worker that exited without being told to, or None."""
        for p in self.processes:
            if p.exited.is_set() and not p.stopping:
                return p.describe()
        return None

    def expect_exit(self) -> None:
        """From now on a worker that exits was told to."""
        for p in self.processes:
            p.stopping = True

    def stop(self, timeout: float) -> None:
        """Wait for the workers to leave (they were told to), killing those that do not in time."""
        self.expect_exit()
        for p in self.processes:
            if not p.exited.wait(timeout):
                p.proc.kill()
                p.exited.wait(5.0)
