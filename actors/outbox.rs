//! The outbox writer: turns many concurrent outbox changes into few batched statements.
//!
//! Group commit: when no batch is running, changes are written at once — after waiting up to
//! `LINGER` for company while fewer than `LINGER_BELOW` are pending; while one runs, changes
//! accumulate and go out together when it finishes — or, once `PARALLEL_BATCH` of them wait,
//! in a batch of their own beside it (up to `MAX_CONCURRENT`). Every transaction costs a
//! commit, so batches are few and large under load, and a moderate load does not pay one
//! commit per change. A batch that fails because PostgreSQL is unreachable is retried with
//! backoff for up to `RETRY_FOR`, so a short database restart costs latency, not messages;
//! after that the callers get the error (and leave their deliveries unacknowledged).

use std::time::{Duration, Instant};

use actix::prelude::*;
use deadpool_postgres::Pool;
use tokio::sync::oneshot;

use crate::actors::supervisor::{backoff, Drain};
use crate::outbox::{self, OpOutcome, OutboxOp};

const MAX_BATCH: usize = 500;
const MAX_CONCURRENT: usize = 3;
/// Changes that may start a batch while another is still running.
const PARALLEL_BATCH: usize = 64;
/// A batch smaller than this, with nothing running, waits up to `LINGER` for more changes.
const LINGER_BELOW: usize = 16;
const LINGER: Duration = Duration::from_millis(1);
const RETRY_FOR: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, thiserror::Error)]
#[error("the outbox could not be written: {0}")]
pub struct OutboxError(pub String);

type Reply = oneshot::Sender<Result<OpOutcome, OutboxError>>;

pub struct OutboxWriter {
    pool: Pool,
    pending: Vec<(OutboxOp, Reply)>,
    running: usize,
    /// A linger timer is set.
    lingering: bool,
    draining: Vec<oneshot::Sender<()>>,
}

impl OutboxWriter {
    pub fn new(pool: Pool) -> Self {
        Self {
            pool,
            pending: Vec::new(),
            running: 0,
            lingering: false,
            draining: Vec::new(),
        }
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
            ctx.spawn(
                async move {
                    let (ops, replies): (Vec<OutboxOp>, Vec<Reply>) = batch.into_iter().unzip();
                    let started = Instant::now();
                    let mut attempt = 0;
                    let result = loop {
                        match outbox::apply(&pool, &ops).await {
                            Ok(outcomes) => break Ok(outcomes),
                            Err(e) if e.is_transient() && started.elapsed() < RETRY_FOR => {
                                tracing::warn!(error = %e, "outbox batch failed; retrying");
                                tokio::time::sleep(backoff(attempt, Duration::from_secs(5))).await;
                                attempt += 1;
                            }
                            Err(e) => break Err(OutboxError(e.to_string())),
                        }
                    };
                    match result {
                        Ok(outcomes) => {
                            tracing::debug!(ops = ops.len(), took = ?started.elapsed(), "outbox batch committed");
                            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                                let _ = reply.send(Ok(outcome));
                            }
                        }
                        Err(e) => {
                            tracing::error!(error = %e, rows = ops.len(), "outbox batch failed");
                            for reply in replies {
                                let _ = reply.send(Err(e.clone()));
                            }
                        }
                    }
                }
                .into_actor(self)
                .map(|_, act, ctx| {
                    act.running -= 1;
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
}

impl Actor for OutboxWriter {
    type Context = Context<Self>;
}

/// Applies one change; resolves when its batch is committed.
#[derive(Message, Debug)]
#[rtype(result = "Result<OpOutcome, OutboxError>")]
pub struct Apply(pub OutboxOp);

impl Handler<Apply> for OutboxWriter {
    type Result = ResponseFuture<Result<OpOutcome, OutboxError>>;

    fn handle(&mut self, msg: Apply, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        self.pending.push((msg.0, tx));
        self.flush(ctx);
        Box::pin(async move {
            rx.await
                .unwrap_or_else(|_| Err(OutboxError("the outbox writer stopped".into())))
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
