"""The backup pipeline: walk, change detection, upload, the library's guards, the run itself."""
