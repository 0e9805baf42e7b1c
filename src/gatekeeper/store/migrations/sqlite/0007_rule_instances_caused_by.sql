-- 7: rules over many things. Rule state is kept per instance: (rule_id, instance), where
-- instance is the item id of a per-item rule and '' for a rule without for_each (SQLite
-- cannot change a primary key: the table is rebuilt, every row kept as instance ''). Decisions,
-- outbox entries, admin acts and standing approvals name their instance (approvals are
-- rebuilt too: their key becomes (rule_id, instance, subject)); a fact recorded by a rule
-- (set_fact) keeps why in fact_log.caused_by (JSON: rule_id, instance, firing_id, depth;
-- NULL for a posted fact).
    CREATE TABLE rule_state_by_instance (
        rule_id TEXT NOT NULL,
        instance TEXT NOT NULL DEFAULT '',
        gate_open INTEGER,
        fired_count INTEGER NOT NULL DEFAULT 0,
        last_fired_at TEXT,
        rule_hash TEXT,
        paused INTEGER NOT NULL DEFAULT 0,
        rearms INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (rule_id, instance)
    );
    INSERT INTO rule_state_by_instance (rule_id, instance, gate_open, fired_count,
        last_fired_at, rule_hash, paused, rearms)
        SELECT rule_id, '', gate_open, fired_count, last_fired_at, rule_hash, paused, rearms
        FROM rule_state;
    DROP TABLE rule_state;
    ALTER TABLE rule_state_by_instance RENAME TO rule_state;
    ALTER TABLE decisions ADD COLUMN instance TEXT NOT NULL DEFAULT '';
    CREATE INDEX decisions_instance ON decisions(rule_id, instance, id);
    ALTER TABLE outbox ADD COLUMN instance TEXT NOT NULL DEFAULT '';
    ALTER TABLE admin_acts ADD COLUMN instance TEXT NOT NULL DEFAULT '';
    ALTER TABLE fact_log ADD COLUMN caused_by TEXT;
    CREATE TABLE approvals_by_instance (
        rule_id TEXT NOT NULL,
        instance TEXT NOT NULL DEFAULT '',
        subject TEXT NOT NULL,
        decision TEXT NOT NULL,
        comment TEXT,
        seq INTEGER NOT NULL REFERENCES fact_log(seq),
        decided_at TEXT NOT NULL,
        PRIMARY KEY (rule_id, instance, subject)
    );
    INSERT INTO approvals_by_instance (rule_id, instance, subject, decision, comment, seq,
        decided_at)
        SELECT rule_id, '', subject, decision, comment, seq, decided_at FROM approvals;
    DROP TABLE approvals;
    ALTER TABLE approvals_by_instance RENAME TO approvals;
