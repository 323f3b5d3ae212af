"""Data in: files -> records (``records``), records -> token ids (``encode``)."""
