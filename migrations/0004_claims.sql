-- Issue 11: at most one transaction per request at a time, and every failure kept whole.
--
-- A request's row is *claimed* when a delivery takes it up (one conditional write): the
-- instance, a token, and an expiry that the holder renews while it works. A second copy of
-- the request that finds a live claim neither sends nor fails it; a claim whose holder died
-- expires (and an instance releases its own at start).
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS claim_owner      text;
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS claim_token      bigint;
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS claim_expires_at timestamptz;
-- The retry parked in a delay queue: only the copy that carries this token continues the
-- request (a re-published copy meanwhile is a duplicate), unless it is long overdue.
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS retry_token      text;
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS next_retry_at    timestamptz;
-- The last failure, whole: what a redelivered copy needs to finish a dead letter the first
-- copy could not.
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS error_class      text;
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS retry_count      integer NOT NULL DEFAULT 0;
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS last_reply       text;
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS dead_lettered_at timestamptz;
-- An attempt whose outcome is unknown: the connection broke after the whole message (final
-- dot included) was written, so the server may have accepted it. Retried by the schedule.
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS uncertain        boolean NOT NULL DEFAULT false;

CREATE INDEX IF NOT EXISTS outbox_claim_owner_idx ON outbox (claim_owner) WHERE claim_owner IS NOT NULL;

-- Inbound: what a dead-lettered email was stored as (its raw bytes), so it can be recovered.
ALTER TABLE inbound_published ADD COLUMN IF NOT EXISTS raw_id text;
ALTER TABLE inbound_published ADD COLUMN IF NOT EXISTS error  text;
