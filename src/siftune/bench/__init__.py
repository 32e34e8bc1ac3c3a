"""``siftune bench``: SIFT against full fine-tuning, LoRA and other sparse methods on the same data and
schedule (runner), how each method is set up (methods) and the tables and figures (report)."""
