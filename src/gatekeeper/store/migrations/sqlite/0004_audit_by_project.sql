-- 4: the audit log is filtered by project
    ALTER TABLE decisions ADD COLUMN project TEXT;
    ALTER TABLE admin_acts ADD COLUMN project TEXT;
    CREATE INDEX decisions_time ON decisions(decided_at, id);
    CREATE INDEX admin_acts_time ON admin_acts(at, id);
