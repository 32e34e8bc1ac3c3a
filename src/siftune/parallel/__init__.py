"""Training over several processes: the process group and batch sharding (distributed) and FSDP2 (sharding)."""
