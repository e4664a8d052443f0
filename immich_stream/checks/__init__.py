"""Checks of a repository and of a setup: verify, doctor."""
