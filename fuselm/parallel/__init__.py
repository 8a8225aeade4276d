"""What several processes computing one model share, below the runner: tensor and expert parallelism
over torch.distributed.

- group.py: the process group a rank computes in (rank, world size, the collectives the layers call,
  the step broadcast on a control group) and WorkerFailedError;
- sharding.py: each rank's ModelConfig and the cut of each checkpoint tensor it holds, applied as
  the loaders read the file; expert_parallel.py: the same for whole experts per rank;
- layers.py: row-parallel linear methods and the vocabulary-parallel embedding and LM head, installed
  by the execution plan over the methods it chose;
- placement.py: experts to ranks from routing statistics (`fuselm placement`);
- cpu_affinity.py: which cores each rank of a machine runs on.

The processes themselves are started and driven by fuselm/executor/, above the runner. Nothing is
imported here, so importing fuselm.parallel.group from the layers stays light.
"""
