-- 14: deliveries claimed with a lease (see SQLite's 0014): the daemon that claimed a
-- pending action and when its claim runs out. Claims take their rows FOR UPDATE SKIP
-- LOCKED, so daemons claiming together get disjoint actions.
    ALTER TABLE outbox ADD COLUMN claimed_by TEXT COLLATE "C";
    ALTER TABLE outbox ADD COLUMN lease_until TEXT COLLATE "C";
