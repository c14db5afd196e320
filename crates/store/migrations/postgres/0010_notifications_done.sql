-- See migrations/sqlite/0010_notifications_done.sql.
CREATE INDEX notifications_done ON notifications (done_at) WHERE done_at IS NOT NULL;
