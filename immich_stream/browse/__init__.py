"""Looking inside snapshots without restoring them: listings, finds and diffs read from the
manifests alone, and the Immich catalog (assets, albums, people, users) read from the dump."""
