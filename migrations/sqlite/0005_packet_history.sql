-- Redrive and Replay send a finished packet back to pending; what it had
-- before (status, outcome, delivery count, when and why it was sent back)
-- is appended here, one JSON object per time, so a replay after a consumer
-- bug never loses the first outcome.
ALTER TABLE packets ADD COLUMN history TEXT NOT NULL DEFAULT '[]'; -- JSON list
