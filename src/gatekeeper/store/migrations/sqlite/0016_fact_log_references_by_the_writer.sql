-- 16: PostgreSQL drops the foreign keys from facts.seq and decisions.fact_seq to fact_log
-- (see its 0016: the writer keeps what they guaranteed). A SQLite file keeps them, checked
-- in process for little, and changes nothing: this version only keeps the numbers of the
-- two backends' schemas meaning the same tables.
-- (SQLite has no statement that changes nothing but this one: every version is one
-- migration per backend.)
    SELECT 1
