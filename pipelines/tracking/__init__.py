"""MLflow at the edge: runs, live metrics from rank 0, reconciliation, lineage and artifacts."""
