-- 15: daemons sharing one database decide in turn (PostgreSQL). The meta row state_version
-- counts the deciding writes (every commit of facts, approvals, admin acts, sign-offs,
-- ruleset activations, ticks, and the ledger writes that change what an escrow has left);
-- a daemon whose memory is at another version is refused and catches up first. A rule
-- state row keeps the version that last wrote it (version), so a daemon catches up on the
-- rule states changed since the version its memory is at. A SQLite file has one daemon: its
-- writes are not checked and leave version NULL (nothing is indexed, nothing costs more).
    ALTER TABLE rule_state ADD COLUMN version INTEGER;
