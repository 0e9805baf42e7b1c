-- 1: the first schema: the fact log, current facts, rulesets, rule states, decisions,
-- the outbox and its delivery attempts
    CREATE TABLE fact_log (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        project TEXT NOT NULL, kind TEXT NOT NULL, id TEXT NOT NULL,
        data TEXT NOT NULL,
        received_at TEXT NOT NULL,
        request_id TEXT
    );
    CREATE TABLE facts (
        project TEXT NOT NULL, kind TEXT NOT NULL, id TEXT NOT NULL,
        data TEXT NOT NULL,
        seq INTEGER NOT NULL REFERENCES fact_log(seq),
        updated_at TEXT NOT NULL,
        PRIMARY KEY (project, kind, id)
    );
    CREATE TABLE rulesets (
        version TEXT PRIMARY KEY,
        files TEXT NOT NULL,
        git_commit TEXT,
        first_activated_at TEXT NOT NULL,
        last_activated_at TEXT NOT NULL
    );
    CREATE TABLE rule_state (
        rule_id TEXT PRIMARY KEY,
        gate_open INTEGER,
        fired_count INTEGER NOT NULL DEFAULT 0,
        last_fired_at TEXT,
        rule_hash TEXT
    );
    CREATE TABLE decisions (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        decided_at TEXT NOT NULL,
        rule_id TEXT NOT NULL,
        rule_hash TEXT NOT NULL,
        ruleset_version TEXT NOT NULL,
        git_commit TEXT,
        trigger TEXT NOT NULL,
        fact_seq INTEGER REFERENCES fact_log(seq),
        outcome TEXT NOT NULL,
        gate_open INTEGER NOT NULL,
        evaluation TEXT NOT NULL,
        approvals TEXT,
        firing_id TEXT UNIQUE,
        request_id TEXT
    );
    CREATE INDEX decisions_rule ON decisions(rule_id, id);
    CREATE TABLE outbox (
        action_id TEXT PRIMARY KEY,
        decision_id INTEGER NOT NULL REFERENCES decisions(id),
        rule_id TEXT NOT NULL,
        firing_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        target TEXT NOT NULL,
        payload TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'pending',
        attempts INTEGER NOT NULL DEFAULT 0,
        created_at TEXT NOT NULL,
        next_attempt_at TEXT NOT NULL,
        last_error TEXT,
        delivered_at TEXT
    );
    CREATE INDEX outbox_due ON outbox(status, next_attempt_at);
    CREATE TABLE delivery_attempts (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        action_id TEXT NOT NULL REFERENCES outbox(action_id),
        attempt INTEGER NOT NULL,
        started_at TEXT NOT NULL,
        latency_ms REAL NOT NULL,
        status_code INTEGER,
        error TEXT
    );
    CREATE INDEX delivery_attempts_action ON delivery_attempts(action_id, attempt);
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
