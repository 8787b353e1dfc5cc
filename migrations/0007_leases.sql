-- Issue 13: several instances on one database.
--
-- Every running instance heartbeats here; an instance whose heartbeat is older than the
-- lease time is taken for dead. `stopped` is set by a graceful stop, so the others take its
-- mailboxes over at once.
CREATE TABLE IF NOT EXISTS instances (
    instance_id  text PRIMARY KEY,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    http_listen  text,
    mailboxes    integer NOT NULL DEFAULT 0,
    stopped      boolean NOT NULL DEFAULT false
);

-- Each mailbox is fetched by the one instance holding its lease. A lease lives as long as its
-- owner's heartbeat (one row to renew per instance, whatever its mailbox count) until it is
-- released. The token grows with every change of holder; a mailbox's position is committed
-- only by the holder of the current token (fencing), so an instance that lost the lease
-- cannot advance it.
CREATE TABLE IF NOT EXISTS mailbox_leases (
    mailbox_id text PRIMARY KEY,
    owner      text NOT NULL,
    token      bigint NOT NULL,
    released   boolean NOT NULL DEFAULT false
);
CREATE INDEX IF NOT EXISTS mailbox_leases_owner_idx ON mailbox_leases (owner);
