-- 5: a dead letter records why it died (attempts_exhausted, too_old, refused: a 4xx answer,
-- not_retryable) and the HTTP status of the attempt that made it one. NULL for dead letters
-- recorded before.
    ALTER TABLE outbox ADD COLUMN dead_reason TEXT;
    ALTER TABLE outbox ADD COLUMN dead_status INTEGER;
