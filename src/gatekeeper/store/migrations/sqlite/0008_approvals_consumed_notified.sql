-- 8: approvals that mean one thing. A rule instance remembers whether its approvals.notify
-- target was told of the current wait for approvals (notified) and how many waits were told
-- (notices, numbering the notice ids); the decision that told it keeps the notice id, which
-- the notice's outbox entry names in place of a firing id. Approvals used up by a firing are
-- deleted from approvals in the firing's transaction (no column: the decision records them).
    ALTER TABLE rule_state ADD COLUMN notified INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE rule_state ADD COLUMN notices INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE decisions ADD COLUMN notice_id TEXT;
    CREATE UNIQUE INDEX decisions_notice ON decisions(notice_id) WHERE notice_id IS NOT NULL;
