-- 14: deliveries claimed with a lease, so several daemons can share one database's outbox
-- and each pending action is in flight at one daemon at a time. claimed_by is the daemon
-- (its daemon_id) that claimed the action to deliver it, lease_until when that claim runs
-- out (RFC 3339 text, like every time): until then no other daemon picks the action, after
-- it any daemon may (its daemon died mid-delivery). Recording an attempt clears both. A
-- SQLite file has one daemon at a time, which releases the claims left in it when it opens
-- the file (outbox_claimed finds the few claimed rows).
    ALTER TABLE outbox ADD COLUMN claimed_by TEXT;
    ALTER TABLE outbox ADD COLUMN lease_until TEXT;
    CREATE INDEX outbox_claimed ON outbox(claimed_by) WHERE claimed_by IS NOT NULL;
