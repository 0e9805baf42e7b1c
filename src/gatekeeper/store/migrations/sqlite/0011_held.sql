-- 11: a number held for another schema change; this file changes nothing and is replaced by it.
    SELECT 1;
