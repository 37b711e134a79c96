"""What every stage shares: typed configs loaded from YAML (config), what never leaves the process (redaction), the
one way from a URL to a filesystem and atomic writes (storage), and the one way to join or start Ray (ray)."""
