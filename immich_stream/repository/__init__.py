"""The repository format: keys, manifests, snapshots, locks, encryption and authentication, prune and key rewrites."""
