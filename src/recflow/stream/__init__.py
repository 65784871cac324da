"""The event log (Redis Streams or the local spool) and the consumer that drains it into the store."""
