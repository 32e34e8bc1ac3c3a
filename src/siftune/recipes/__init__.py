"""Ready-made training: the ``siftune train`` loop, the transformers Trainer integration, the built-in
models and datasets, and metric logging."""
