'use strict';
// Issue 15's Node.js inbound reference: what a competent team would write with the usual
// libraries. imapflow fetches every message of INBOX (one streamed UID FETCH of the sources),
// mailparser's simpleParser parses each, and the guide's `email.inbound` JSON is published,
// persistent, on a confirm channel (confirms awaited in batches). Parsing and publishing run
// with bounded concurrency while the fetch streams on. Attachments are described (name, type,
// size) but not stored anywhere, and nothing is recorded in a database: see the report.
//
// Env: IMAP_HOST, IMAP_PORT, IMAP_USER, IMAP_PASS, AMQP_URL, EXPECT_N (exits after that many
// are confirmed), QUEUE (default email.inbound), CONCURRENCY (64), CONFIRM_BATCH (500).

const { ImapFlow } = require('imapflow');
const { simpleParser } = require('mailparser');
const amqp = require('amqplib');

const env = (name, fallback) => {
    const v = process.env[name];
    if (v === undefined || v === '') {
        if (fallback === undefined) throw new Error(`${name} is not set`);
        return fallback;
    }
    return v;
};

const QUEUE = env('QUEUE', 'email.inbound');
const EXPECT_N = Number(env('EXPECT_N', '0'));
const CONCURRENCY = Number(env('CONCURRENCY', '64'));
const CONFIRM_BATCH = Number(env('CONFIRM_BATCH', '500'));
const TENANT_ID = env('TENANT_ID', 'bench');
const PROVIDER_ID = env('PROVIDER_ID', 'files');

const REPLY = ['re:', 'aw:', 'sv:', 'antw:', 'réf:', 'ref:', 'odp:', 'vs:'];
const FORWARD = ['fwd:', 'fw:', 'wg:', 'tr:', 'rv:', 'enc:', 'doorst:'];
const AUTO = ['auto:', 'automatic reply:', 'autoreply:', 'auto-reply:', 'out of office'];
const startsWithAny = (s, prefixes) => {
    const l = s.trimStart().toLowerCase();
    return prefixes.some((p) => l.startsWith(p));
};
const strip = (id) => (id || '').trim().replace(/^<+|>+$/g, '');
const ids = (v) => {
    if (!v) return [];
    const list = Array.isArray(v) ? v : String(v).split(/\s+/);
    return list.map(strip).filter(Boolean);
};
const addresses = (a) => {
    if (!a) return [];
    const groups = Array.isArray(a) ? a : [a];
    const out = [];
    for (const g of groups) {
        for (const x of g.value || []) {
            if (x.address) out.push(x.address);
            for (const y of x.group || []) if (y.address) out.push(y.address);
        }
    }
    return out;
};

/** The guide's inbound message from a parsed email. */
function inboundEmail(parsed, internalDate) {
    const subject = parsed.subject || '';
    const messageId = strip(parsed.messageId);
    const inReplyTo = ids(parsed.inReplyTo)[0] || null;
    const references = ids(parsed.references);
    const from = parsed.from && parsed.from.value && parsed.from.value[0];
    const headers = {};
    for (const line of parsed.headerLines || []) {
        const i = line.line.indexOf(':');
        if (i < 0) continue;
        const name = line.line.slice(0, i);
        const value = line.line.slice(i + 1).replace(/\r?\n/g, '').trim();
        headers[name] = name in headers ? `${headers[name]}, ${value}` : value;
    }
    const h = (name) => parsed.headers.get(name.toLowerCase());
    const autoSubmitted = h('auto-submitted');
    const html = typeof parsed.html === 'string' && parsed.html.length > 0;
    const received = internalDate || parsed.date || new Date();
    return {
        tenant_id: TENANT_ID,
        provider_id: PROVIDER_ID,
        message_id: messageId,
        in_reply_to: inReplyTo,
        references: references.length ? references.join(',') : null,
        subject,
        from_email: (from && from.address) || '',
        from_name: (from && from.name) || null,
        to_emails: addresses(parsed.to),
        cc_emails: addresses(parsed.cc),
        bcc_emails: addresses(parsed.bcc),
        body_format: html ? 'HTML' : 'TEXT',
        body_content: html ? parsed.html : parsed.text || '',
        attachments: (parsed.attachments || []).map((a, i) => ({
            filename: a.filename || `attachment-${i + 1}`,
            url: '',
            mime_type: a.contentType || 'application/octet-stream',
            size: a.size,
        })),
        headers,
        is_reply: Boolean(inReplyTo) || startsWithAny(subject, REPLY),
        is_forward: Boolean(h('x-forwarded-message-id') || h('resent-from')) || startsWithAny(subject, FORWARD),
        is_auto_reply:
            (autoSubmitted !== undefined && String(autoSubmitted).toLowerCase() !== 'no') ||
            startsWithAny(subject, AUTO),
        thread_id: references[0] || inReplyTo || messageId,
        received_at: new Date(received).toISOString().replace(/\.\d{3}Z$/, 'Z'),
        priority: parsed.priority || 'normal',
        source: 'imap',
    };
}

async function main() {
    const started = process.hrtime.bigint();
    const conn = await amqp.connect(env('AMQP_URL'));
    const ch = await conn.createConfirmChannel();
    await ch.assertQueue(QUEUE, { durable: true });

    const client = new ImapFlow({
        host: env('IMAP_HOST', '127.0.0.1'),
        port: Number(env('IMAP_PORT')),
        secure: false,
        doSTARTTLS: false,
        auth: { user: env('IMAP_USER'), pass: env('IMAP_PASS') },
        logger: false,
        disableAutoIdle: true,
    });
    await client.connect();
    const lock = await client.getMailboxLock('INBOX');

    let published = 0;
    let unconfirmed = 0;
    let failed = 0;
    const inflight = new Set();
    let confirming = Promise.resolve();

    const publish = async (msg) => {
        const parsed = await simpleParser(msg.source, {
            skipTextToHtml: true,
            skipImageLinks: true,
            checksumAlgo: false,
        });
        const body = Buffer.from(JSON.stringify(inboundEmail(parsed, msg.internalDate)));
        const ok = ch.publish('', QUEUE, body, {
            persistent: true,
            contentType: 'application/json',
            messageId: strip(parsed.messageId) || undefined,
        });
        published += 1;
        unconfirmed += 1;
        if (unconfirmed >= CONFIRM_BATCH) {
            unconfirmed = 0;
            const previous = confirming;
            confirming = previous.then(() => ch.waitForConfirms());
            await confirming;
        } else if (!ok) {
            await new Promise((resolve) => ch.once('drain', resolve));
        }
    };

    try {
        for await (const msg of client.fetch('1:*', { source: true, uid: true, internalDate: true })) {
            const p = publish(msg)
                .catch((e) => {
                    failed += 1;
                    console.error(`uid ${msg.uid}: ${e.message}`);
                })
                .finally(() => inflight.delete(p));
            inflight.add(p);
            if (inflight.size >= CONCURRENCY) await Promise.race(inflight);
        }
        await Promise.all(inflight);
        await ch.waitForConfirms();
    } finally {
        lock.release();
    }
    await client.logout();
    const secs = Number(process.hrtime.bigint() - started) / 1e9;
    console.log(`published ${published} (${failed} failed) confirmed in ${secs.toFixed(2)} s`);
    await ch.close();
    await conn.close();
    if (failed > 0 || (EXPECT_N > 0 && published < EXPECT_N)) {
        console.error(`expected ${EXPECT_N}, published ${published}`);
        process.exit(1);
    }
}

main().catch((e) => {
    console.error(e);
    process.exit(1);
});
