-- 10: shadow mode and the two-person rule for money rules. A decision keeps the mode its
-- rule ran in when it was not live (shadow, awaiting_signoff; NULL: live); the outbox keeps
-- a shadowed firing's actions with status 'shadowed' (no schema change: never due, never
-- in the ledger). A sign-off of a money rule's content hash is an admin act 'signoff'
-- (subject: the rule id, reason: the comment) with the hash in rule_hash; an admin signs
-- a hash at most once. A rule instance remembers the content hash whose wait for
-- sign-offs the alert target was told of (once per hash).
    ALTER TABLE decisions ADD COLUMN mode TEXT;
    ALTER TABLE rule_state ADD COLUMN signoff_alerted TEXT;
    ALTER TABLE admin_acts ADD COLUMN rule_hash TEXT;
    CREATE UNIQUE INDEX admin_acts_signoffs ON admin_acts(rule_hash, actor) WHERE act = 'signoff';
