'use strict';
// The outbound reference of the throughput bench (issue 15): what a competent Node.js team
// builds with the libraries EmailEngine uses. It consumes the guide's requests from
// `email.send` (amqplib, prefetch 200, deliveries handled concurrently), sends each over a
// pooled nodemailer SMTP transport (8 connections), records it with one `pg` insert (pool of
// 8), publishes the guide's result on a confirm channel and waits for the confirm, then acks.
//
// Environment: AMQP_URL, DATABASE_URL, SMTP_HOST, SMTP_PORT, QUEUE (email.send),
// RESULT_QUEUE (email.send.result), PREFETCH (200), SMTP_CONNECTIONS (8), PG_POOL (8), N (exit
// after N messages are done; 0 runs forever).

const amqp = require('amqplib');
const nodemailer = require('nodemailer');
const { Pool } = require('pg');

const env = (name, fallback) => process.env[name] || fallback;
const AMQP_URL = env('AMQP_URL', 'amqp://guest:guest@127.0.0.1:5672/');
const QUEUE = env('QUEUE', 'email.send');
const RESULT_QUEUE = env('RESULT_QUEUE', 'email.send.result');
const PREFETCH = Number(env('PREFETCH', '200'));
const N = Number(env('N', '0'));
const MAX_RETRIES = 3;

const pool = new Pool({
  connectionString: env('DATABASE_URL', 'postgres://127.0.0.1:5432/postgres'),
  max: Number(env('PG_POOL', '8')),
});

const transporter = nodemailer.createTransport({
  pool: true,
  maxConnections: Number(env('SMTP_CONNECTIONS', '8')),
  host: env('SMTP_HOST', '127.0.0.1'),
  port: Number(env('SMTP_PORT', '25')),
  secure: false,
  ignoreTLS: true, // smtp-sink: plain SMTP, no auth
});

const providerName = 'smtp';

function domainOf(address) {
  const m = /@([^>\s]+)>?\s*$/.exec(String(address || ''));
  return m ? m[1] : 'localhost';
}

function mailOf(req) {
  const html = String(req.body_format || 'HTML').toUpperCase() === 'HTML';
  return {
    from: req.from,
    to: req.to,
    cc: req.cc,
    bcc: req.bcc,
    subject: req.subject,
    [html ? 'html' : 'text']: req.body_content,
    headers: req.headers || {},
    // Stable per request, so that replies can be matched to it.
    messageId: `<${req.message_id}@${domainOf(req.from)}>`,
    attachments: (req.attachments || []).map((a) => ({
      filename: a.filename,
      href: a.url,
      contentType: a.mime_type,
    })),
  };
}

async function record(req, status, providerMessageId, sentAt) {
  await pool.query(
    `INSERT INTO ref_outbox (tenant_id, message_id, status, provider_message_id, sent_at)
     VALUES ($1, $2, $3, $4, $5)
     ON CONFLICT (tenant_id, message_id) DO UPDATE
       SET status = EXCLUDED.status, provider_message_id = EXCLUDED.provider_message_id,
           sent_at = EXCLUDED.sent_at, updated_at = now()`,
    [req.tenant_id, req.message_id, status, providerMessageId, sentAt],
  );
}

function publishResult(confirmCh, result) {
  return new Promise((resolve, reject) => {
    confirmCh.sendToQueue(
      RESULT_QUEUE,
      Buffer.from(JSON.stringify(result)),
      { persistent: true, contentType: 'application/json' },
      (err) => (err ? reject(err) : resolve()),
    );
  });
}

// A permanent failure: the server refused the message for good (5xx) or the request is bad.
function permanent(err) {
  return (err && err.responseCode >= 500) || err.code === 'EENVELOPE' || err.code === 'EMESSAGE';
}

async function main() {
  await pool.query(`CREATE TABLE IF NOT EXISTS ref_outbox (
    tenant_id text NOT NULL,
    message_id text NOT NULL,
    status text NOT NULL,
    provider_message_id text,
    sent_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, message_id)
  )`);

  const conn = await amqp.connect(AMQP_URL);
  const ch = await conn.createChannel();
  const confirmCh = await conn.createConfirmChannel();
  await ch.assertQueue(QUEUE, { durable: true });
  await confirmCh.assertQueue(RESULT_QUEUE, { durable: true });
  await ch.prefetch(PREFETCH);

  let done = 0;
  let finishing = false;
  const finish = async () => {
    if (finishing) return;
    finishing = true;
    const took = process.uptime();
    const usage = process.resourceUsage();
    console.log(
      `processed ${done} in ${took.toFixed(2)} s (from process start); ` +
        `maxrss_kb ${usage.maxRSS}; cpu_s ${((usage.userCPUTime + usage.systemCPUTime) / 1e6).toFixed(2)}`,
    );
    await ch.close().catch(() => {});
    await confirmCh.close().catch(() => {});
    await conn.close().catch(() => {});
    transporter.close();
    await pool.end().catch(() => {});
    process.exit(0);
  };
  const completed = () => {
    done += 1;
    if (N > 0 && done >= N) finish();
  };

  const handle = async (msg) => {
    let req;
    try {
      req = JSON.parse(msg.content.toString('utf8'));
    } catch (err) {
      // Not JSON: retrying cannot help; drop it (to the DLQ, when the queue has one).
      console.error(`unparseable request: ${err.message}`);
      ch.nack(msg, false, false);
      completed();
      return;
    }
    let info;
    try {
      info = await transporter.sendMail(mailOf(req));
    } catch (err) {
      if (!permanent(err) && !msg.fields.redelivered) {
        // Transient (connection, 4xx): back to the queue for another try.
        ch.nack(msg, false, true);
        return;
      }
      try {
        await record(req, 'failed', null, null);
        await publishResult(confirmCh, {
          success: false,
          tenant_id: req.tenant_id,
          message_id: req.message_id,
          status: 'failed',
          error: err.message,
          retry_count: msg.fields.redelivered ? 1 : 0,
          max_retries: MAX_RETRIES,
        });
        ch.ack(msg);
        completed();
      } catch (inner) {
        console.error(`recording a failure: ${inner.message}`);
        ch.nack(msg, false, true);
      }
      return;
    }
    try {
      const sentAt = new Date().toISOString();
      await record(req, 'sent', info.messageId, sentAt);
      await publishResult(confirmCh, {
        success: true,
        tenant_id: req.tenant_id,
        message_id: req.message_id,
        status: 'sent',
        provider_response: {
          provider_name: providerName,
          provider_message_id: info.messageId,
          sent_at: sentAt,
        },
      });
      ch.ack(msg);
      completed();
    } catch (err) {
      // Sent, but not recorded or not confirmed: requeue (at-least-once, as most teams do).
      console.error(`after sending ${req.message_id}: ${err.message}`);
      ch.nack(msg, false, true);
    }
  };

  await ch.consume(
    QUEUE,
    (msg) => {
      if (msg) handle(msg);
    },
    { noAck: false },
  );

  const stop = () => finish();
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  conn.on('error', (err) => console.error(`amqp: ${err.message}`));
  conn.on('close', () => {
    if (!finishing) {
      console.error('amqp connection closed');
      process.exit(1);
    }
  });
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
