-- Issue 12 (inbound APIs): a mailbox's position is a JSON cursor whose shape is its source's
-- (`intake::MailboxCursor`):
--   {"kind":"imap","uidvalidity":N,"last_uid":N}
--   {"kind":"pop3"}                                        (first contact done)
--   {"kind":"gmail_api","history_id":"…","floor":unix|null}
--   {"kind":"ms_graph","delta_link":"…","floor":unix|null}
-- Existing rows were written by IMAP (UIDVALIDITY, last UID) or POP3 ((0, 0), "first contact
-- done"); both become the `imap` shape, which a POP3 mailbox reads as "first contact done".
ALTER TABLE mailbox_state ADD COLUMN IF NOT EXISTS cursor jsonb;
UPDATE mailbox_state
   SET cursor = jsonb_build_object('kind', 'imap', 'uidvalidity', uidvalidity, 'last_uid', last_uid)
 WHERE cursor IS NULL;
ALTER TABLE mailbox_state ALTER COLUMN cursor SET NOT NULL;
ALTER TABLE mailbox_state DROP COLUMN IF EXISTS uidvalidity;
ALTER TABLE mailbox_state DROP COLUMN IF EXISTS last_uid;
