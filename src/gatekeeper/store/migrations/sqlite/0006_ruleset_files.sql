-- 6: a ruleset version's files are kept once per content: ruleset_files holds each text
-- under its content hash (the SHA-256, hex, of its UTF-8 text: gk_sha256(), a function
-- the store registers on its connection) and rulesets.files maps each file name to the
-- content hash of its text. Rulesets are listed by last_activated_at, then version.
    CREATE TABLE ruleset_files (
        content_hash TEXT PRIMARY KEY,
        text TEXT NOT NULL
    );
    INSERT OR IGNORE INTO ruleset_files (content_hash, text)
        SELECT gk_sha256(files.value), files.value
        FROM rulesets, json_each(rulesets.files) AS files;
    UPDATE rulesets SET files = (
        SELECT json_group_object(files.key, gk_sha256(files.value))
        FROM json_each(rulesets.files) AS files
    );
    CREATE INDEX rulesets_activated ON rulesets(last_activated_at, version);
