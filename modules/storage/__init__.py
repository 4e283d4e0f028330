"""Storage: artifacts, step logs, job records, model formats and datasets."""
