"""FlexDeMo: decoupled-momentum exchange between the nodes of an FSDP2 hybrid-sharded run.

Library code with no hydra dependency. The optimizer lands here next (see the README's status section).
"""

__all__: list[str] = []
