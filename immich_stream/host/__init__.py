"""The host layer: the Immich stack in Docker, exec in its containers, Postgres, this host's state."""
