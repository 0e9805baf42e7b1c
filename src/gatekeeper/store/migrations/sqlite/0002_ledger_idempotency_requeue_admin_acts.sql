-- 2: the release ledger, blocked decisions, idempotent ingest, requeued dead letters,
-- admin acts
    ALTER TABLE decisions ADD COLUMN reason TEXT;
    CREATE TABLE ledger (
        release_id TEXT PRIMARY KEY REFERENCES outbox(action_id),
        escrow TEXT NOT NULL,
        amount TEXT NOT NULL,
        currency TEXT NOT NULL,
        payee TEXT NOT NULL,
        rule_id TEXT NOT NULL,
        firing_id TEXT NOT NULL,
        recorded_at TEXT NOT NULL
    );
    CREATE INDEX ledger_escrow ON ledger(escrow);
    CREATE TABLE idempotency_keys (
        key TEXT PRIMARY KEY,
        request_hash TEXT NOT NULL,
        seqs TEXT NOT NULL,
        request_id TEXT,
        created_at TEXT NOT NULL
    );
    CREATE INDEX idempotency_keys_created ON idempotency_keys(created_at);
    ALTER TABLE outbox ADD COLUMN requeued_at TEXT;
    ALTER TABLE outbox ADD COLUMN attempts_at_requeue INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE admin_acts (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at TEXT NOT NULL,
        actor TEXT NOT NULL,
        act TEXT NOT NULL,
        subject TEXT NOT NULL,
        reason TEXT
    );
