"""Restores: files, the database, a dump to a file, and the drill's restore into a throwaway container.

files.py         restore_files: a snapshot's files into a directory (restorer.py writes
                 each entry safely, copies.py names what was not restored and where a copy is)
database.py      restore_database: the dump into the database container through psql
dump.py          dump_to: --dump-to, the stored dump into a file, device or pipe
config_files.py  write_config_files: --config-files, the recorded compose files
drill.py         run_drill: the dump into a throwaway container, row counts compared
"""

from immich_stream.restore.config_files import write_config_files
from immich_stream.restore.database import restore_database
from immich_stream.restore.dump import dump_to
from immich_stream.restore.files import restore_files

__all__ = ["dump_to", "restore_database", "restore_files", "write_config_files"]
