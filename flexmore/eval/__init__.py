"""Evaluation: per-domain validation loss, generative exact-match and multiple-choice tasks, tidy result rows."""
