"""What is written to disk and read back: training checkpoints (DCP, one's own resume), model folders (safetensors +
JSON, what crosses between owners) and the FlexDeMo residuals inside checkpoints. Below training and experts."""
