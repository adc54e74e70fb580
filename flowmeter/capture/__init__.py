"""The capture stage: a source in, decoded packet batches out to the shard workers (``process.run``)."""
