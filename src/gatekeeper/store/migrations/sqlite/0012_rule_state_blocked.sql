-- 12: a firing whose release was refused (over the escrow's limit, another currency, a bad
-- amount) no longer counts as the rule instance's firing. The instance keeps why in blocked
-- (the decision's reason; NULL when it is not blocked) until it fires, and counts such
-- firings in blocks, which numbers firing ids together with fired_count (the next firing is
-- fired_count + blocks + 1), so a firing id is never used twice.
    ALTER TABLE rule_state ADD COLUMN blocked TEXT;
    ALTER TABLE rule_state ADD COLUMN blocks INTEGER NOT NULL DEFAULT 0;
