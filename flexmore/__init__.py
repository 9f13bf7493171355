"""FlexMoRE: FlexOlmo-style federated experts (full-size or low-rank) trained against a frozen public base."""

__version__ = "0.1.0"
