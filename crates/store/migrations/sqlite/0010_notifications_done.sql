-- Finished messages (delivered or given up) are deleted once past kas's retention, oldest first
-- and in batches: this index finds them without reading the messages still to send.
CREATE INDEX notifications_done ON notifications (done_at) WHERE done_at IS NOT NULL;
