"""immich-stream: back up a self-hosted Immich server straight into S3."""

__version__ = "0.1.0"
