"""Entry points: the only modules that import hydra."""

from flexmore.experts.router import MAX_SEQS


def check_max_seqs(max_seqs: int) -> None:
    """An owner's sample for router fitting is small: ``--max-seqs`` in [1, MAX_SEQS]."""
    if not 1 <= max_seqs <= MAX_SEQS:
        raise ValueError(f"--max-seqs={max_seqs} must be in [1, {MAX_SEQS}]: a small sample per owner")


def check_seq_len(seq_len: int, max_seq_len: int) -> None:
    if not 1 <= seq_len <= max_seq_len:
        raise ValueError(f"--seq-len={seq_len} must be in [1, the model's max_seq_len={max_seq_len}]")


TRUST_HELP = ("also read a training checkpoint (DCP) folder: its metadata is a pickle that runs code when loaded, so "
              "only for your own runs; models from others come as model folders (safetensors)")
