"""Files in and out: atomic writes, the content-keyed cache, the restricted unpickler, records, checkpoints."""
