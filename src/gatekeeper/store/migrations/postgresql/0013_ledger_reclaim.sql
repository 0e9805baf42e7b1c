-- 13: a release the bank paid after all (see SQLite's 0013): the ledger's movements gain
-- reclaim (PostgreSQL changes the CHECK constraint in place: no rebuild), and
-- settlement_callbacks keeps each callback's outcome and the provider's reference.
    ALTER TABLE ledger_entries DROP CONSTRAINT ledger_entries_movement_check;
    ALTER TABLE ledger_entries ADD CONSTRAINT ledger_entries_movement_check CHECK (movement IN
        ('reserve', 'send', 'settle', 'fail', 'cancel', 'return', 'reclaim'));
    ALTER TABLE settlement_callbacks ADD COLUMN outcome TEXT COLLATE "C";
    ALTER TABLE settlement_callbacks ADD COLUMN reference TEXT COLLATE "C";
