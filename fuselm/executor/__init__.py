"""Running a model's ranks as processes, above the runner and below the engine.

- worker.py: a worker rank's life (load its shard, execute the steps rank 0 broadcasts);
- executor.py: rank 0's side, which the engine holds in place of a ModelRunner;
- mp_workers.py and ray_workers.py start the other ranks as local processes or as Ray actors.

Nothing is imported here.
"""
