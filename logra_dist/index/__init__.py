"""Layer 2: the index on disk (format, codecs, writer and partial shards, the one verified reader,
resume, inspect). Knows h5py and numpy; nothing of models or engines."""
