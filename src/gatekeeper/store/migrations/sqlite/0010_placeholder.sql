-- 10: no change to the schema (a placeholder; the migration numbered 10 replaces it).
    SELECT 1;
