"""Run folders: one owner for reading and writing them (``io``), the entropy run, its shards."""
