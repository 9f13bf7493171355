"""Multi-process layout: the (replicate, shard) device mesh and how each sync strategy shards the model."""

from flexmore.parallel.mesh import ParallelContext, init_parallel, resolve_layout
from flexmore.parallel.parallelize import build_parallel_model
from flexmore.parallel.strategy import STRATEGIES, Strategy, get_strategy

__all__ = ["ParallelContext", "init_parallel", "resolve_layout", "STRATEGIES", "Strategy", "get_strategy",
           "build_parallel_model"]
