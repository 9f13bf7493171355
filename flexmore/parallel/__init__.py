"""Multi-process layout: the (replicate, shard) device mesh and how each sync strategy shards the model."""

from flexmore.parallel.mesh import ParallelContext, init_parallel, resolve_layout
from flexmore.parallel.parallelize import STRATEGIES, build_parallel_model

__all__ = ["ParallelContext", "init_parallel", "resolve_layout", "STRATEGIES", "build_parallel_model"]
