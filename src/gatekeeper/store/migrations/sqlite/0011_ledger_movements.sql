-- 11: the ledger's movements. ledger keeps one row per release (what was decided);
-- ledger_entries one row per movement of a release's amount: reserve (decided and queued, in
-- the decision's transaction), send (the bank answered 2xx, with the attempt's record),
-- settle or fail (the bank's signed settlement callback, with its reference), cancel (an
-- admin act, with the actor and reason) and return (the amount goes back to the escrow,
-- after cancel or fail). A release has each movement at most once. Amounts are decimal
-- strings. Existing releases get their reserve (at recorded_at) and, once delivered, their
-- send (at delivered_at), so old databases reconcile.
-- outbox.attempt_started_at is set (for a release) just before its request is sent and
-- cleared when the attempt's outcome is recorded: while set, the release cannot be
-- cancelled (the bank may have it). outbox.status gains 'cancelled' (never due again).
-- settlement_callbacks keeps each accepted settlement callback's webhook-id per target with
-- the SHA-256 of its body: a replayed webhook-id is never applied twice.
    CREATE TABLE ledger_entries (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        release_id TEXT NOT NULL REFERENCES ledger(release_id),
        escrow TEXT NOT NULL,
        movement TEXT NOT NULL
            CHECK (movement IN ('reserve', 'send', 'settle', 'fail', 'cancel', 'return')),
        amount TEXT NOT NULL,
        currency TEXT NOT NULL,
        at TEXT NOT NULL,
        actor TEXT,
        reference TEXT,
        reason TEXT
    );
    CREATE UNIQUE INDEX ledger_entries_once ON ledger_entries(release_id, movement);
    CREATE INDEX ledger_entries_escrow ON ledger_entries(escrow, id);
    INSERT INTO ledger_entries (release_id, escrow, movement, amount, currency, at, actor)
        SELECT release_id, escrow, 'reserve', amount, currency, recorded_at, rule_id
        FROM ledger ORDER BY recorded_at, release_id;
    INSERT INTO ledger_entries (release_id, escrow, movement, amount, currency, at, actor)
        SELECT ledger.release_id, ledger.escrow, 'send', ledger.amount, ledger.currency,
            COALESCE(outbox.delivered_at, ledger.recorded_at), outbox.target
        FROM ledger JOIN outbox ON outbox.action_id = ledger.release_id
        WHERE outbox.status = 'delivered'
        ORDER BY outbox.delivered_at, ledger.release_id;
    ALTER TABLE outbox ADD COLUMN attempt_started_at TEXT;
    CREATE TABLE settlement_callbacks (
        target TEXT NOT NULL,
        webhook_id TEXT NOT NULL,
        body_sha256 TEXT NOT NULL,
        release_id TEXT NOT NULL,
        received_at TEXT NOT NULL,
        PRIMARY KEY (target, webhook_id)
    );
