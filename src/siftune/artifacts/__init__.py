"""What a run leaves on disk: the increment, the training checkpoints, and the atomic writes under both."""
