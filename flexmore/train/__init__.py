"""Training: the loop, its optimizer and schedule, checkpoints, logging and throughput accounting."""
