-- Issue 15: the last outbox write of an email ("result published": `result_published_at` and
-- the end of its claim) changes no indexed column, so PostgreSQL makes it a HOT update (no
-- index entries; the new row version on the same page, which keeps room for it).
--
-- The claim owner is no longer indexed: a start releases its previous run's claims through
-- the status index (`outbox::release_claims_of`).
DROP INDEX IF EXISTS outbox_claim_owner_idx;
-- The dashboard's outbox page lists the newest requests first, by `created_at`;
-- (tenant_id, updated_at) served no query.
DROP INDEX IF EXISTS outbox_updated_idx;
CREATE INDEX IF NOT EXISTS outbox_created_idx ON outbox (created_at DESC);
ALTER TABLE outbox SET (fillfactor = 70);
