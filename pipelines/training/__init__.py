"""Shards to checkpoints: Ray Train driver and worker loop, safe training state, progress on the driver."""
