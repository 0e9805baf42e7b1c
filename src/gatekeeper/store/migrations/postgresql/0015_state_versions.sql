-- 15: daemons sharing one database decide in turn (see SQLite's 0015). version is the
-- meta row state_version of the deciding write that last wrote a rule state; the indexes
-- serve a daemon's catch-up (the rule states written since a version) and the position it
-- reaches (the last sign-off, the last ledger movement that changes what an escrow has
-- left), each read without a scan.
    ALTER TABLE rule_state ADD COLUMN version BIGINT;
    CREATE INDEX rule_state_version ON rule_state(version) WHERE version IS NOT NULL;
    CREATE INDEX admin_acts_signoff_ids ON admin_acts(id) WHERE act = 'signoff';
    CREATE INDEX ledger_entries_committed ON ledger_entries(id)
        WHERE movement IN ('reserve', 'return', 'reclaim');
