-- When kas last saw each agent token in use (Unix seconds): set while a connection
-- authenticated with it is open (kas records the tokens of its live streams at connect and at
-- each token re-check), so an operator rotating tokens sees whether the old one is still used.
-- NULL: not seen in use since this column exists.
ALTER TABLE agent_tokens ADD COLUMN last_used_at BIGINT;
