"""What every stage shares: typed configs loaded from YAML, and what never leaves the process."""
