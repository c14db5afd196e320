-- Where a project's Git repository is. Secrets (Git credentials, webhook secrets) are not stored
-- here: only the paths of files holding them, so a leaked database holds no secret.
ALTER TABLE projects ADD COLUMN remote TEXT;
ALTER TABLE projects ADD COLUMN credentials_file TEXT;
ALTER TABLE projects ADD COLUMN webhook_secret_file TEXT;
