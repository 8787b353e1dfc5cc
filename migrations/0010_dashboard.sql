-- Issue 14 (the operator dashboard): what the outbox page searches and shows of an email.
--
-- The recipients (to, cc, bcc; lower-cased, ", "-separated) and the subject of a request,
-- written with its first claim, so the outbox can be searched by recipient.
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS recipients text;
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS subject    text;
CREATE INDEX IF NOT EXISTS outbox_updated_idx ON outbox (tenant_id, updated_at DESC);

-- An email's history beyond its row: every failed attempt (retrying or failed, with its
-- error), its dead letter and its replays. Written with the outbox operation, in the same
-- transaction; a sent email's success is its row's `sent_at`.
CREATE TABLE IF NOT EXISTS outbox_events (
    id           bigserial   PRIMARY KEY,
    tenant_id    text        NOT NULL,
    message_id   text        NOT NULL,
    at           timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- 'retrying', 'failed', 'dead-lettered', 'replayed'
    event        text        NOT NULL,
    error        text,
    error_class  text,
    retry_count  integer,
    last_reply   text
);
CREATE INDEX IF NOT EXISTS outbox_events_key_idx ON outbox_events (tenant_id, message_id, id);

-- Inbound emails that answer a sent one: the request's `message_id` (the published
-- `reply_to_message_id`) and its tenant.
ALTER TABLE inbound_published ADD COLUMN IF NOT EXISTS reply_tenant_id     text;
ALTER TABLE inbound_published ADD COLUMN IF NOT EXISTS reply_to_message_id text;
CREATE INDEX IF NOT EXISTS inbound_published_reply_idx
    ON inbound_published (reply_tenant_id, reply_to_message_id)
    WHERE reply_to_message_id IS NOT NULL;
