"""Running one model over several processes: tensor parallelism over torch.distributed.

- group.py: the process group a rank computes in (rank, world size, the collectives the layers call,
  the step broadcast on a control group) and WorkerFailedError; imports nothing of the runner or engine;
- sharding.py: each rank's ModelConfig and the cut of each checkpoint tensor it holds, applied as
  the loaders read the file;
- layers.py: row-parallel linear methods and the vocabulary-parallel embedding and LM head, installed
  by the execution plan over the methods it chose;
- cpu_affinity.py: which cores each rank of a machine runs on;
- worker.py: a worker rank's life (load its shard, execute the steps rank 0 broadcasts);
- executor.py: rank 0's side, which the engine holds in place of a ModelRunner; mp_workers.py and
  ray_workers.py start the other ranks as local processes or as Ray actors.

Nothing is imported here, so importing fuselm.parallel.group from the layers stays light.
"""
