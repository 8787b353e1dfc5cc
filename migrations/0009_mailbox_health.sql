-- Issue 13: the health of every mailbox, whichever instance fetches it, so that `/health`
-- and `/api/mailboxes` of any instance show the cluster. Each instance writes the rows of
-- the mailboxes it fetches (coalesced, about once a second) and deletes them when it stops
-- fetching one; `health` is the mailbox's `/health` entry.
CREATE TABLE IF NOT EXISTS mailbox_health (
    mailbox_id  text PRIMARY KEY,
    tenant_id   text NOT NULL,
    instance_id text NOT NULL,
    status      text NOT NULL,
    health      jsonb NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
