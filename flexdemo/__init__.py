"""FlexDeMo: decoupled-momentum exchange between the nodes of an FSDP2 hybrid-sharded run.

Library code with no hydra dependency: ``FlexDeMo(params, replicate_group=..., lr=...)`` for FSDP2-sharded (DTensor) or
plain parameters, ``DeMo`` for the all-replica case, ``DeMoConfig`` for the settings.
"""

from flexdemo.chunks import ChunkLayout
from flexdemo.config import DeMoConfig
from flexdemo.optimizer import DeMo, FlexDeMo, check_runnable, local_tensor

__all__ = ["ChunkLayout", "DeMoConfig", "DeMo", "FlexDeMo", "check_runnable", "local_tensor"]
