"""The event store: validated, deduplicated Parquet partitions, and data versions."""
