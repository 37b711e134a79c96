"""Corpus to shards: corpus generators, checking one image, the Ray Data sharding job, shards into batches."""
