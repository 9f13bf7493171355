"""The FlexMoRE study as commands: rank sweeps over extracted experts, the rank-vs-score regression, rank allocation."""
