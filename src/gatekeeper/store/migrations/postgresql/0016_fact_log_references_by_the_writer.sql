-- 16: the foreign keys from facts.seq and decisions.fact_seq to fact_log are dropped on
-- PostgreSQL, where each row inserted ran a query of its own to check its key (6 per fact
-- an ingest writes). What they guaranteed, the writer keeps: a facts row and a decision
-- naming a fact log entry are written in the transaction that writes that entry, after it
-- (SqlStore._write_transitions: facts.seq is the seq of the log row written with it,
-- decisions.fact_seq the seq of a fact of the decision's own transition, or NULL); no
-- statement deletes or renumbers a fact log entry; and a copy into PostgreSQL checks every
-- table's rows against its source (copy-db's digests), a copy into SQLite its keys as well.
-- SQLite keeps its foreign keys (its checks are in-process lookups; see SQLite's 0016).
    ALTER TABLE facts DROP CONSTRAINT facts_seq_fkey;
    ALTER TABLE decisions DROP CONSTRAINT decisions_fact_seq_fkey
