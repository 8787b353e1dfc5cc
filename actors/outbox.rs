//! The outbox writer: turns many concurrent outbox changes into few batched statements, and
//! keeps the claims this instance holds.
//!
//! Group commit: when no batch is running, changes are written at once — after waiting up to
//! `LINGER` for company while fewer than `LINGER_BELOW` are pending; while one runs, changes
//! accumulate and go out together when it finishes — or, once `PARALLEL_BATCH` of them wait,
//! in a batch of their own beside it (up to `MAX_CONCURRENT`). Every transaction costs a
//! commit, so batches are few and large under load, and a moderate load does not pay one
//! commit per change.
//!
//! Failures: a batch that fails because PostgreSQL is unreachable, restarting or shutting
//! down (by SQLSTATE, see `storage::is_transient_pg`) is retried with backoff for up to
//! `RETRY_FOR`, so a restart costs latency, not messages; after that its callers get
//! [`OutboxError::Unavailable`]. A batch that fails on its *data* is split: every change is
//! run on its own, so only the one the database refuses fails ([`OutboxError::Refused`]) and
//! the others of its batch go through.
//!
//! Claims: the writer hands out claim tokens (a random number per writer, in the high half,
//! and a counter) and remembers which claims are held. A second claim of a request held here
//! waits for the holder's outcome and is then tried again (so a redelivered copy never runs
//! beside its first copy, and then finds the first copy's outcome); a claim this writer
//! handed out and has seen released — though the release did not reach the database — is
//! taken over at once; a claim of anyone else is reported, and the caller waits for it to
//! be released or to expire. Held claims are renewed every third of their lifetime.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use actix::prelude::*;
use deadpool_postgres::Pool;
use tokio::sync::oneshot;

use crate::actors::supervisor::{backoff, Drain};
use crate::outbox::{
    self, ClaimConfig, ClaimRequest, NewRow, OpOutcome, OutboxKey, OutboxOp, RowState, RowStatus,
};

const MAX_BATCH: usize = 500;
const MAX_CONCURRENT: usize = 3;
/// Changes that may start a batch while another is still running.
const PARALLEL_BATCH: usize = 64;
/// A batch smaller than this, with nothing running, waits up to `LINGER` for more changes.
const LINGER_BELOW: usize = 16;
const LINGER: Duration = Duration::from_millis(1);
const RETRY_FOR: Duration = Duration::from_secs(30);

/// Why a change was not made.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OutboxError {
    /// PostgreSQL could not be reached for `RETRY_FOR`: try again later.
    #[error("the outbox could not be written (PostgreSQL unavailable): {0}")]
    Unavailable(String),
    /// PostgreSQL refused this change's data: it will be refused again.
    #[error("the outbox refused this change: {0}")]
    Refused(String),
}

/// A claim, as its caller sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum ClaimOutcome {
    /// Held, with this token, until an outcome or a release.
    Claimed {
        token: i64,
        attempts: i32,
        deliveries: i32,
    },
    /// Not claimed: terminal, held by someone else, or a retry of it is parked.
    NotClaimed(Box<RowState>),
}

type Reply = oneshot::Sender<Result<OpOutcome, OutboxError>>;

/// A claim held by this writer.
struct Held {
    token: i64,
    since: Instant,
    /// Claims of the same request, tried again once this one is released.
    waiters: Vec<(ClaimRequest, Reply)>,
}

pub struct OutboxWriter {
    pool: Pool,
    claims: ClaimConfig,
    /// The high half of this writer's claim tokens.
    generation: i64,
    counter: u32,
    held: HashMap<OutboxKey, Held>,
    pending: Vec<(OutboxOp, Reply)>,
    running: usize,
    /// A linger timer is set.
    lingering: bool,
    draining: Vec<oneshot::Sender<()>>,
}

impl OutboxWriter {
    pub fn new(pool: Pool, owner: String, claim_ttl: Duration) -> Self {
        let mut random = [0u8; 4];
        let _ = aws_lc_rs::rand::fill(&mut random);
        Self {
            pool,
            claims: ClaimConfig {
                owner,
                ttl_secs: claim_ttl.as_secs_f64(),
            },
            generation: i64::from(u32::from_le_bytes(random) & 0x7fff_ffff) << 32,
            counter: 0,
            held: HashMap::new(),
            pending: Vec::new(),
            running: 0,
            lingering: false,
            draining: Vec::new(),
        }
    }

    fn next_token(&mut self) -> i64 {
        self.counter = self.counter.wrapping_add(1);
        self.generation | i64::from(self.counter)
    }

    fn mine(&self, token: i64) -> bool {
        token & !0xffff_ffff == self.generation
    }

    /// Starts what may start now, or lets a small batch linger.
    fn flush(&mut self, ctx: &mut Context<Self>) {
        let few = !self.pending.is_empty() && self.pending.len() < LINGER_BELOW;
        if self.running == 0 && few {
            if !self.lingering {
                self.lingering = true;
                ctx.run_later(LINGER, |act, ctx| {
                    act.lingering = false;
                    act.start_batches(ctx);
                });
            }
            return;
        }
        self.start_batches(ctx);
    }

    /// Starts batches of what is pending: one when nothing runs, more beside it once
    /// `PARALLEL_BATCH` wait.
    fn start_batches(&mut self, ctx: &mut Context<Self>) {
        while !self.pending.is_empty()
            && (self.running == 0
                || (self.running < MAX_CONCURRENT && self.pending.len() >= PARALLEL_BATCH))
        {
            let n = self.pending.len().min(MAX_BATCH);
            let batch: Vec<(OutboxOp, Reply)> = self.pending.drain(..n).collect();
            self.running += 1;
            let pool = self.pool.clone();
            let claims = self.claims.clone();
            let (ops, replies): (Vec<OutboxOp>, Vec<Reply>) = batch.into_iter().unzip();
            ctx.spawn(
                async move {
                    let results = run_batch(&pool, &claims, &ops).await;
                    (ops, replies, results)
                }
                .into_actor(self)
                .map(|(ops, replies, results), act, ctx| {
                    act.running -= 1;
                    for ((op, reply), result) in ops.into_iter().zip(replies).zip(results) {
                        act.settle(op, reply, result);
                    }
                    act.flush(ctx);
                    if act.running == 0 && act.pending.is_empty() && !act.draining.is_empty() {
                        for d in act.draining.drain(..) {
                            let _ = d.send(());
                        }
                        ctx.stop();
                    }
                }),
            );
        }
    }

    /// What a committed (or failed) change means for the claims held here, then the reply.
    fn settle(&mut self, op: OutboxOp, reply: Reply, result: Result<OpOutcome, OutboxError>) {
        match (&op, result) {
            (OutboxOp::Claim(c), Ok(claimed @ OpOutcome::Claimed { .. })) => {
                self.held.insert(
                    c.row.key.clone(),
                    Held {
                        token: c.token,
                        since: Instant::now(),
                        waiters: Vec::new(),
                    },
                );
                let _ = reply.send(Ok(claimed));
            }
            (OutboxOp::Claim(c), Ok(OpOutcome::NotClaimed(state))) => {
                let ours = state.claim_live
                    && state.claim_owner.as_deref() == Some(self.claims.owner.as_str());
                let token = state.claim_token.filter(|_| ours);
                let held_token = self.held.get(&c.row.key).map(|h| h.token);
                match token {
                    // The first copy is still at work here: wait for its outcome.
                    Some(t) if held_token == Some(t) => {
                        if let Some(h) = self.held.get_mut(&c.row.key) {
                            h.waiters.push((c.clone(), reply));
                        }
                    }
                    // A claim of this writer, released since: take it over.
                    Some(t) if self.mine(t) && c.steal != Some(t) => {
                        let mut again = c.clone();
                        again.steal = Some(t);
                        self.pending.push((OutboxOp::Claim(again), reply));
                    }
                    _ => {
                        let _ = reply.send(Ok(OpOutcome::NotClaimed(state)));
                    }
                }
            }
            (_, result) => {
                // A claim ends when its request is finished (the result published) or back
                // in the broker's hands (a retry parked), once that is committed; a release
                // ends it anyway (its holder is done, whether or not the database heard it).
                let ends = match (&op, &result) {
                    (OutboxOp::Release { token, .. }, _) => Some(*token),
                    (
                        OutboxOp::ResultPublished {
                            token: Some(token), ..
                        },
                        Ok(_),
                    ) => Some(*token),
                    (OutboxOp::Failed(f), Ok(_)) if f.status == RowStatus::Retrying => {
                        Some(f.token)
                    }
                    _ => None,
                };
                if let Some(token) = ends {
                    self.release_held(op.key(), token);
                }
                let _ = reply.send(result);
            }
        }
    }

    /// Forgets the held claim `token` and lets its waiters try again.
    fn release_held(&mut self, key: &OutboxKey, token: i64) {
        let matches = self.held.get(key).is_some_and(|h| h.token == token);
        if !matches {
            return;
        }
        if let Some(h) = self.held.remove(key) {
            for (mut c, reply) in h.waiters {
                c.steal = None;
                self.pending.push((OutboxOp::Claim(c), reply));
            }
        }
    }

    /// Renews the claims held longer than a third of their lifetime.
    fn renew(&mut self, ctx: &mut Context<Self>) {
        let third = Duration::from_secs_f64(self.claims.ttl_secs / 3.0);
        let now = Instant::now();
        let due: Vec<(OutboxKey, i64)> = self
            .held
            .iter_mut()
            .filter(|(_, h)| now.duration_since(h.since) >= third)
            .map(|(k, h)| {
                h.since = now;
                (k.clone(), h.token)
            })
            .collect();
        if due.is_empty() {
            return;
        }
        tracing::debug!(claims = due.len(), "renewing held outbox claims");
        for (key, token) in due {
            let (tx, _rx) = oneshot::channel();
            self.pending.push((OutboxOp::Renew { key, token }, tx));
        }
        self.flush(ctx);
    }
}

/// Runs one batch: in one transaction, retried while PostgreSQL is unavailable; split into
/// single changes when the data of one of them is refused.
async fn run_batch(
    pool: &Pool,
    claims: &ClaimConfig,
    ops: &[OutboxOp],
) -> Vec<Result<OpOutcome, OutboxError>> {
    let started = Instant::now();
    match with_retries(pool, claims, ops, started).await {
        Ok(outcomes) => {
            tracing::debug!(ops = ops.len(), took = ?started.elapsed(), "outbox batch committed");
            outcomes.into_iter().map(Ok).collect()
        }
        Err(Failure::Data(e)) if ops.len() > 1 => {
            tracing::warn!(error = %e, rows = ops.len(),
                "an outbox batch was refused for its data; writing its changes one by one");
            let mut out = Vec::with_capacity(ops.len());
            for op in ops {
                let one = std::slice::from_ref(op);
                out.push(
                    match with_retries(pool, claims, one, Instant::now()).await {
                        Ok(mut o) => Ok(o.pop().unwrap_or(OpOutcome::Done)),
                        Err(Failure::Data(e)) => {
                            tracing::error!(error = %e, tenant_id = %op.key().tenant_id,
                            message_id = %op.key().message_id, "outbox change refused");
                            Err(OutboxError::Refused(e))
                        }
                        Err(Failure::Unavailable(e)) => Err(OutboxError::Unavailable(e)),
                    },
                );
            }
            out
        }
        Err(f) => {
            let e = match f {
                Failure::Data(e) => OutboxError::Refused(e),
                Failure::Unavailable(e) => OutboxError::Unavailable(e),
            };
            tracing::error!(error = %e, rows = ops.len(), "outbox batch failed");
            ops.iter().map(|_| Err(e.clone())).collect()
        }
    }
}

enum Failure {
    Data(String),
    Unavailable(String),
}

async fn with_retries(
    pool: &Pool,
    claims: &ClaimConfig,
    ops: &[OutboxOp],
    started: Instant,
) -> Result<Vec<OpOutcome>, Failure> {
    let mut attempt = 0;
    loop {
        match outbox::apply(pool, claims, ops).await {
            Ok(outcomes) => return Ok(outcomes),
            Err(e) if e.is_transient() && started.elapsed() < RETRY_FOR => {
                tracing::warn!(error = %e, "outbox batch failed; retrying");
                tokio::time::sleep(backoff(attempt, Duration::from_secs(5))).await;
                attempt += 1;
            }
            Err(e) if e.is_transient() => return Err(Failure::Unavailable(e.to_string())),
            // Not transient: the data (or, rarely, a statement) is refused; splitting the
            // batch tells which change it was.
            Err(e) => return Err(Failure::Data(e.to_string())),
        }
    }
}

impl Actor for OutboxWriter {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let every = Duration::from_secs_f64((self.claims.ttl_secs / 3.0).max(1.0)) / 2;
        ctx.run_interval(every, |act, ctx| act.renew(ctx));
    }
}

/// Applies one change; resolves when its batch is committed.
#[derive(Message, Debug)]
#[rtype(result = "Result<OpOutcome, OutboxError>")]
pub struct Apply(pub OutboxOp);

impl Handler<Apply> for OutboxWriter {
    type Result = ResponseFuture<Result<OpOutcome, OutboxError>>;

    fn handle(&mut self, msg: Apply, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        if let OutboxOp::Release { key, token } = &msg.0 {
            // The holder is done now, whatever the database says.
            self.release_held(key, *token);
        }
        self.pending.push((msg.0, tx));
        self.flush(ctx);
        Box::pin(async move {
            rx.await.unwrap_or_else(|_| {
                Err(OutboxError::Unavailable("the outbox writer stopped".into()))
            })
        })
    }
}

/// Takes up a request (see the module documentation); resolves once it is claimed, or
/// known not to be.
#[derive(Message, Debug)]
#[rtype(result = "Result<ClaimOutcome, OutboxError>")]
pub struct Claim {
    pub row: NewRow,
    /// The parked retry this copy continues, when it is one.
    pub retry_token: Option<String>,
}

impl Handler<Claim> for OutboxWriter {
    type Result = ResponseFuture<Result<ClaimOutcome, OutboxError>>;

    fn handle(&mut self, msg: Claim, ctx: &mut Context<Self>) -> Self::Result {
        let token = self.next_token();
        let (tx, rx) = oneshot::channel();
        let claim = ClaimRequest {
            row: msg.row,
            token,
            retry_token: msg.retry_token,
            steal: None,
        };
        self.pending.push((OutboxOp::Claim(claim), tx));
        self.flush(ctx);
        Box::pin(async move {
            match rx.await {
                Ok(Ok(OpOutcome::Claimed {
                    attempts,
                    deliveries,
                })) => Ok(ClaimOutcome::Claimed {
                    token,
                    attempts,
                    deliveries,
                }),
                Ok(Ok(OpOutcome::NotClaimed(state))) => Ok(ClaimOutcome::NotClaimed(state)),
                Ok(Ok(other)) => Err(OutboxError::Unavailable(format!(
                    "unexpected claim outcome {other:?}"
                ))),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(OutboxError::Unavailable("the outbox writer stopped".into())),
            }
        })
    }
}

impl Handler<Drain> for OutboxWriter {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: Drain, ctx: &mut Context<Self>) -> Self::Result {
        if self.running == 0 && self.pending.is_empty() {
            ctx.stop();
            return Box::pin(async {});
        }
        let (tx, rx) = oneshot::channel();
        self.draining.push(tx);
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}
