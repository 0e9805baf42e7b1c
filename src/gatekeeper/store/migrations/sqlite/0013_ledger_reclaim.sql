-- 13: a release the bank paid after all. The ledger gains the movement reclaim: the amount
-- a cancel returned to the escrow goes back out of it, because the bank's signed settlement
-- callback says it settled the release anyway (reclaim, then send and settle). SQLite cannot
-- change a CHECK constraint, so ledger_entries is rebuilt with the same rows, ids and
-- indexes. settlement_callbacks keeps each callback's outcome (settled or failed) and the
-- provider's reference (NULL for those recorded before), so a failure reported for a
-- cancelled release, which moves nothing, is still known.
    CREATE TABLE ledger_entries_13 (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        release_id TEXT NOT NULL REFERENCES ledger(release_id),
        escrow TEXT NOT NULL,
        movement TEXT NOT NULL CHECK (movement IN
            ('reserve', 'send', 'settle', 'fail', 'cancel', 'return', 'reclaim')),
        amount TEXT NOT NULL,
        currency TEXT NOT NULL,
        at TEXT NOT NULL,
        actor TEXT,
        reference TEXT,
        reason TEXT
    );
    INSERT INTO ledger_entries_13
        (id, release_id, escrow, movement, amount, currency, at, actor, reference, reason)
        SELECT id, release_id, escrow, movement, amount, currency, at, actor, reference, reason
        FROM ledger_entries ORDER BY id;
    DROP TABLE ledger_entries;
    ALTER TABLE ledger_entries_13 RENAME TO ledger_entries;
    CREATE UNIQUE INDEX ledger_entries_once ON ledger_entries(release_id, movement);
    CREATE INDEX ledger_entries_escrow ON ledger_entries(escrow, id);
    ALTER TABLE settlement_callbacks ADD COLUMN outcome TEXT;
    ALTER TABLE settlement_callbacks ADD COLUMN reference TEXT;
