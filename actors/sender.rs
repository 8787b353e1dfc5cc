//! A sender actor: one per provider, delivering emails through that provider's transport
//! (`crate::providers`: SMTP sessions, files, …), reporting the provider's health and the
//! time each send took.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::{oneshot, Semaphore};

use crate::actors::metrics::{MetricsActor, Observe, ReportHealth, SetGauge, SetGaugeSample};
use crate::actors::supervisor::{Abort, Drain};
use crate::domain::{ComponentHealth, ComponentId};
use crate::oauth2::Accounts;
use crate::outbound::OutgoingEmail;
use crate::providers::limits::{Limit, RateLimiter, Slot};
use crate::providers::{Accepted, SendError, Transport, TransportContext};
use crate::settings::Provider;

pub struct SenderActor {
    provider: Provider,
    /// The provider's transport, or why it could not be set up (every send fails with it).
    transport: Result<Rc<dyn Transport>, SendError>,
    metrics: Addr<MetricsActor>,
    /// `rate_per_second` and `rate_per_day`.
    limiter: Rc<RefCell<RateLimiter>>,
    /// `max_in_flight`.
    in_flight_limit: Option<Rc<Semaphore>>,
    last_ok: Option<bool>,
    in_flight: usize,
    draining: Vec<oneshot::Sender<()>>,
}

impl SenderActor {
    pub fn new(
        provider: Provider,
        send_timeout: Duration,
        metrics: Addr<MetricsActor>,
        accounts: Arc<Accounts>,
    ) -> Self {
        let transport = provider
            .config
            .transport(&TransportContext {
                send_timeout,
                max_connections: provider.max_connections,
                provider_id: provider.id.clone(),
                accounts,
            })
            .map(Rc::from);
        let limits = provider.limits;
        Self {
            provider,
            transport,
            metrics,
            limiter: Rc::new(RefCell::new(RateLimiter::new(limits))),
            in_flight_limit: limits
                .max_in_flight
                .map(|n| Rc::new(Semaphore::new(n as usize))),
            last_ok: None,
            in_flight: 0,
            draining: Vec::new(),
        }
    }

    /// `mailbridge_sends_in_flight{tenant, provider}`: sends begun and not yet answered
    /// (waiting for their rate included).
    fn gauge_in_flight(&self) {
        self.metrics.do_send(SetGaugeSample(SetGauge {
            name: "mailbridge_sends_in_flight",
            labels: vec![
                ("tenant", self.provider.tenant_id.clone()),
                ("provider", self.provider.id.clone()),
            ],
            value: self.in_flight as f64,
        }));
    }

    fn report(&mut self, ok: bool, error: Option<String>) {
        if self.last_ok == Some(ok) {
            return;
        }
        self.last_ok = Some(ok);
        let health = match error {
            Some(e) if !ok => ComponentHealth::down(e),
            _ => ComponentHealth::ok(),
        };
        self.metrics.do_send(ReportHealth {
            id: ComponentId::Provider(self.provider.id.clone()),
            health: health
                .with("tenant", self.provider.tenant_id.clone())
                .with("name", self.provider.name.clone())
                .with("kind", self.provider.config.kind()),
        });
    }
}

impl Actor for SenderActor {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Context<Self>) {
        if let Err(e) = &self.transport {
            let e = e.to_string();
            self.report(false, Some(e));
        }
    }
}

/// Deliver one email through this provider.
#[derive(Message)]
#[rtype(result = "Result<Accepted, SendError>")]
pub struct Deliver {
    pub email: std::sync::Arc<OutgoingEmail>,
    pub tenant_id: String,
}

impl Handler<Deliver> for SenderActor {
    type Result = ResponseActFuture<Self, Result<Accepted, SendError>>;

    fn handle(&mut self, msg: Deliver, _: &mut Context<Self>) -> Self::Result {
        self.in_flight += 1;
        self.gauge_in_flight();
        let transport = self.transport.clone();
        let metrics = self.metrics.clone();
        // The rate limits first: a send is held up to `MAX_WAIT` for its slot, or parked.
        let slot = self.limiter.borrow_mut().reserve(Instant::now());
        let in_flight_limit = self.in_flight_limit.clone();
        let labels = vec![
            ("tenant", msg.tenant_id.clone()),
            ("provider", self.provider.id.clone()),
        ];
        Box::pin(
            async move {
                let wait = match slot {
                    Slot::After(wait) => wait,
                    Slot::Park { wait, limit } => {
                        return Err(SendError::Deferred {
                            limit: match limit {
                                Limit::PerSecond => "rate_per_second",
                                Limit::PerDay => "rate_per_day",
                            },
                            wait,
                        })
                    }
                };
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
                // The semaphore is never closed; a send without a permit would only exceed it.
                let _permit = match &in_flight_limit {
                    Some(s) => s.acquire().await.ok(),
                    None => None,
                };
                let started = Instant::now();
                let result = match &transport {
                    Ok(t) => t.send(&msg.email).await,
                    Err(e) => Err(e.clone()),
                };
                metrics.do_send(Observe {
                    name: "mailbridge_send_duration_seconds",
                    labels,
                    value: started.elapsed().as_secs_f64(),
                });
                result
            }
            .into_actor(self)
            .map(|result, act, ctx| {
                act.in_flight -= 1;
                act.gauge_in_flight();
                match &result {
                    Ok(_) => act.report(true, None),
                    // A rejected email says nothing about the provider's health.
                    Err(e) if e.is_about_the_email() => {}
                    Err(e) => act.report(false, Some(e.to_string())),
                }
                if act.in_flight == 0 && !act.draining.is_empty() {
                    for d in act.draining.drain(..) {
                        let _ = d.send(());
                    }
                    ctx.stop();
                }
                result
            }),
        )
    }
}

impl Handler<Abort> for SenderActor {
    type Result = ();

    /// The shutdown grace is over: no transaction starts any more; those not past their final
    /// dot are abandoned (their requests go back to the broker), those past it run to their
    /// reply, so what the server accepted is recorded before the process exits.
    fn handle(&mut self, _: Abort, _: &mut Context<Self>) {
        tracing::info!(provider_id = %self.provider.id, "abandoning the transactions not yet sent");
        if let Ok(t) = &self.transport {
            t.abort();
        }
    }
}

impl Handler<Drain> for SenderActor {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: Drain, ctx: &mut Context<Self>) -> Self::Result {
        if self.in_flight == 0 {
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
