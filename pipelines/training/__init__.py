"""Shards to checkpoints: the recipes' configs (config), the Ray Train driver (driver) and the loop every worker
runs (loop), how the model is spread over ranks (parallel: DDP, FSDP2 with meta-device init), weights and
checkpoints (weights), training state read back without unpickling (safe_dcp), progress on the driver (progress)."""
