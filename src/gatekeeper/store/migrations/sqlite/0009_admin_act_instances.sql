-- 9: an admin act on a per-item rule as a whole (pause, resume, rearm without an item)
-- keeps how many of its instances it changed. NULL: an act on one instance or on a rule
-- without for_each. (A per-item rule paused as a whole is kept in rule_state, as the state
-- of its instance '', which such a rule never evaluates: no column for it.)
    ALTER TABLE admin_acts ADD COLUMN instances INTEGER;
