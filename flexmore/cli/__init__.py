"""Entry points: the only modules that import hydra."""

TRUST_HELP = ("also read a training checkpoint (DCP) folder: its metadata is a pickle that runs code when loaded, so "
              "only for your own runs; models from others come as model folders (safetensors)")
