-- 3: approvals (each also appended to fact_log as kind 'approval'), paused and
-- re-armed rules
    CREATE TABLE approvals (
        rule_id TEXT NOT NULL,
        subject TEXT NOT NULL,
        decision TEXT NOT NULL,
        comment TEXT,
        seq INTEGER NOT NULL REFERENCES fact_log(seq),
        decided_at TEXT NOT NULL,
        PRIMARY KEY (rule_id, subject)
    );
    ALTER TABLE rule_state ADD COLUMN paused INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE rule_state ADD COLUMN rearms INTEGER NOT NULL DEFAULT 0;
