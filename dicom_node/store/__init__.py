"""Store: the database, the one owner of state transitions (track), leases, heartbeats, spool, watermark, schema migrations."""
