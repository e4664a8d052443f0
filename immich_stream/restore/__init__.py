"""Restores: files, the database, a dump to a file, and the drill's restore into a throwaway container."""
