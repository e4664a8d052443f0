"""The S3 layer: a Store that moves bytes (retries, the direct path, writers, pacing, budget)."""
