//! The HTTP surface (contract §6), served by actix-web.
//!
//! Handlers hold no state of their own: each asks the actor that owns the answer
//! (the metrics actor for `/health` and `/metrics`, the supervisor for queue depths).

use std::sync::Arc;

use actix::Addr;
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use serde::Deserialize;

use crate::actors::dlq::{DeadLetterActor, ListDeadLetters, ReplayDeadLetters};
use crate::actors::metrics::{GetHealth, MetricsActor, RenderMetrics};
use crate::actors::supervisor::{ChildId, FindChild, GetQueueStatus, Reload, Supervisor};
use crate::attachments::{AttachmentError, AttachmentStore};
use crate::dlq::Selection;
use crate::settings::{Secret, Settings};

#[derive(Clone)]
pub struct AppState {
    pub metrics: Addr<MetricsActor>,
    pub supervisor: Addr<Supervisor>,
    pub settings: Arc<Settings>,
    /// The bearer token of the admin endpoints; `None` disables them.
    pub admin_token: Option<Secret>,
    pub attachments: Arc<AttachmentStore>,
    pub pool: deadpool_postgres::Pool,
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/health", web::get().to(health))
        .route("/metrics", web::get().to(metrics))
        .route("/api/rabbitmq/status", web::get().to(queue_status))
        .route("/api/mailboxes", web::get().to(mailboxes))
        .route("/api/cluster", web::get().to(cluster))
        .route("/api/dlq", web::get().to(dlq_list))
        .route("/api/dlq/replay", web::post().to(dlq_replay))
        .route("/api/attachments/{id}", web::get().to(attachment))
        .route("/api/config/reload", web::post().to(config_reload));
}

/// `POST /api/config/reload`: 200 with what changed, 422 with every problem when refused.
async fn config_reload(state: web::Data<AppState>, req: HttpRequest) -> HttpResponse {
    if let Some(refusal) = refuse_unauthorized(&state, &req) {
        return refusal;
    }
    match state.supervisor.send(Reload { source: "HTTP" }).await {
        Ok(outcome) if outcome.applied => HttpResponse::Ok().json(serde_json::json!({
            "success": true, "outcome": outcome,
        })),
        Ok(outcome) => HttpResponse::UnprocessableEntity().json(serde_json::json!({
            "success": false,
            "error": "the configuration was refused; the running one stays in force",
            "outcome": outcome,
        })),
        Err(_) => unavailable("supervisor"),
    }
}

#[derive(Deserialize)]
struct AttachmentQuery {
    expires: i64,
    sig: String,
    #[serde(default)]
    name: String,
    #[serde(default, rename = "type")]
    mime: String,
}

/// An inbound attachment, by the signed link published in `email.inbound`.
async fn attachment(
    state: web::Data<AppState>,
    id: web::Path<String>,
    query: Option<web::Query<AttachmentQuery>>,
) -> HttpResponse {
    let Some(q) = query else {
        return HttpResponse::Forbidden()
            .json(serde_json::json!({"success": false, "error": "a signed link is required"}));
    };
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let opened = match state
        .attachments
        .check_link(&id, q.expires, &q.name, &q.mime, &q.sig, now)
    {
        Ok(()) => state.attachments.serve(&id).await,
        Err(e) => Err(e),
    };
    let refusal =
        |e: AttachmentError| serde_json::json!({"success": false, "error": e.to_string()});
    match opened {
        Ok(opened) => {
            let mime = if q.mime.is_empty() {
                "application/octet-stream".to_string()
            } else {
                q.mime.clone()
            };
            let name = q.name.replace(['"', '\\', '\r', '\n'], "_");
            let body = opened
                .body
                .map(|part| part.map(web::Bytes::from).map_err(std::io::Error::other));
            HttpResponse::Ok()
                .content_type(mime)
                .insert_header((
                    "Content-Disposition",
                    format!("attachment; filename=\"{name}\""),
                ))
                .insert_header(("ETag", format!("\"{id}\"")))
                .body(actix_web::body::SizedStream::new(opened.size, body))
        }
        Err(e @ AttachmentError::Expired) => HttpResponse::Gone().json(refusal(e)),
        Err(e @ AttachmentError::NotFound) => HttpResponse::NotFound().json(refusal(e)),
        Err(e @ (AttachmentError::BadSignature | AttachmentError::ShortKey { .. })) => {
            HttpResponse::Forbidden().json(refusal(e))
        }
        Err(e) => {
            tracing::warn!(error = %e, "an attachment could not be served");
            HttpResponse::ServiceUnavailable().json(refusal(e))
        }
    }
}

/// Checks `Authorization: Bearer <token>` against the configured admin token; the refusal
/// to send when it does not match.
fn refuse_unauthorized(state: &AppState, req: &HttpRequest) -> Option<HttpResponse> {
    let Some(expected) = &state.admin_token else {
        return Some(HttpResponse::Forbidden().json(serde_json::json!({
            "success": false,
            "error": format!(
                "admin endpoints are disabled: set the environment variable {} to a token",
                state.settings.http.admin_token_env
            ),
        })));
    };
    let given = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if constant_time_eq(given.as_bytes(), expected.expose().as_bytes()) {
        None
    } else {
        Some(
            HttpResponse::Unauthorized()
                .insert_header(("WWW-Authenticate", "Bearer"))
                .json(serde_json::json!({
                    "success": false,
                    "error": "missing or wrong bearer token (Authorization: Bearer <token>)",
                })),
        )
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn dlq_actor(state: &AppState) -> Option<Addr<DeadLetterActor>> {
    state
        .supervisor
        .send(FindChild::<DeadLetterActor>::of(ChildId::Dlq))
        .await
        .ok()
        .flatten()
}

#[derive(Deserialize)]
struct DlqListQuery {
    queue: Option<String>,
    limit: Option<usize>,
}

async fn dlq_list(
    state: web::Data<AppState>,
    req: HttpRequest,
    query: web::Query<DlqListQuery>,
) -> HttpResponse {
    if let Some(refusal) = refuse_unauthorized(&state, &req) {
        return refusal;
    }
    let Some(actor) = dlq_actor(&state).await else {
        return unavailable("DLQ actor (it needs the RabbitMQ connection)");
    };
    let queue = query
        .queue
        .clone()
        .unwrap_or_else(|| state.settings.queues.send_dlq());
    let limit = query.limit.unwrap_or(100).min(10_000);
    match actor
        .send(ListDeadLetters {
            queue: queue.clone(),
            limit,
        })
        .await
    {
        Ok(Ok(entries)) => HttpResponse::Ok().json(serde_json::json!({
            "success": true, "queue": queue, "count": entries.len(), "entries": entries,
        })),
        Ok(Err(e)) => {
            HttpResponse::BadRequest().json(serde_json::json!({"success": false, "error": e}))
        }
        Err(_) => unavailable("DLQ actor"),
    }
}

#[derive(Deserialize)]
struct ReplayBody {
    queue: Option<String>,
    #[serde(default)]
    all: bool,
    #[serde(default)]
    message_ids: Vec<String>,
    /// Only entries of this tenant.
    tenant_id: Option<String>,
}

async fn dlq_replay(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Json<ReplayBody>,
) -> HttpResponse {
    if let Some(refusal) = refuse_unauthorized(&state, &req) {
        return refusal;
    }
    let ids = (!body.message_ids.is_empty()).then(|| body.message_ids.clone());
    let selection = match (body.all, ids, body.tenant_id.clone()) {
        (all, ids, Some(t)) if all != ids.is_some() => Selection::Tenant(t, ids),
        (true, None, None) => Selection::All,
        (false, Some(ids), None) => Selection::MessageIds(ids),
        _ => {
            return HttpResponse::BadRequest().json(serde_json::json!({
                "success": false,
                "error": "give either \"all\": true or a non-empty \"message_ids\" list",
            }))
        }
    };
    let Some(actor) = dlq_actor(&state).await else {
        return unavailable("DLQ actor (it needs the RabbitMQ connection)");
    };
    let queue = body
        .queue
        .clone()
        .unwrap_or_else(|| state.settings.queues.send_dlq());
    match actor.send(ReplayDeadLetters { queue, selection }).await {
        Ok(Ok(report)) => HttpResponse::Ok().json(serde_json::json!({
            "success": true, "replayed": report.replayed, "kept": report.kept,
            "already_published": report.already_published, "not_replayed": report.not_replayed,
        })),
        Ok(Err(e)) => {
            HttpResponse::BadRequest().json(serde_json::json!({"success": false, "error": e}))
        }
        Err(_) => unavailable("DLQ actor"),
    }
}

fn unavailable(what: &str) -> HttpResponse {
    HttpResponse::ServiceUnavailable().json(serde_json::json!({
        "success": false,
        "error": format!("the {what} is not running; the supervisor restarts it"),
    }))
}

/// The mailboxes the other instances fetch, from `mailbox_health`; none when PostgreSQL does
/// not answer within a second (the database component then says why).
async fn other_mailboxes(
    state: &AppState,
) -> std::collections::BTreeMap<String, crate::domain::ComponentHealth> {
    let read = crate::mailbox_health::others(
        &state.pool,
        &state.settings.instance_id,
        state.settings.cluster.lease_ttl.0,
    );
    match tokio::time::timeout(std::time::Duration::from_secs(1), read).await {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "the cluster's mailbox health could not be read");
            Default::default()
        }
        Err(_) => Default::default(),
    }
}

async fn health(state: web::Data<AppState>) -> HttpResponse {
    let ask = GetHealth {
        instance_id: state.settings.instance_id.clone(),
        others: other_mailboxes(&state).await,
    };
    match state.metrics.send(ask).await {
        Ok(report) if report.ready() => HttpResponse::Ok().json(report),
        Ok(report) => HttpResponse::ServiceUnavailable().json(report),
        Err(_) => unavailable("metrics actor"),
    }
}

#[derive(Deserialize)]
struct MailboxesQuery {
    status: Option<crate::domain::ComponentState>,
    tenant: Option<String>,
    #[serde(default)]
    offset: usize,
    limit: Option<usize>,
}

/// The mailboxes' health a page at a time (`/health` lists them all): `?status=down`,
/// `?tenant=…`, `?offset=…&limit=…` (100 by default, at most 1,000).
async fn mailboxes(
    state: web::Data<AppState>,
    query: Result<web::Query<MailboxesQuery>, actix_web::Error>,
) -> HttpResponse {
    let query = match query {
        Ok(q) => q.into_inner(),
        Err(e) => {
            return HttpResponse::BadRequest().json(serde_json::json!({
                "success": false,
                "error": format!("{e}; use status=ok|down|starting, tenant=<id>, offset=<n>, limit=<1..1000>"),
            }))
        }
    };
    let limit = query.limit.unwrap_or(100).clamp(1, 1000);
    match state
        .metrics
        .send(crate::actors::metrics::ListMailboxes {
            others: other_mailboxes(&state).await,
            status: query.status,
            tenant: query.tenant,
            offset: query.offset,
            limit,
        })
        .await
    {
        Ok(mut page) => {
            for m in &mut page.mailboxes {
                m.health
                    .details
                    .entry("instance".into())
                    .or_insert_with(|| state.settings.instance_id.clone().into());
            }
            HttpResponse::Ok().json(page)
        }
        Err(_) => unavailable("metrics actor"),
    }
}

/// `GET /api/cluster`: this instance, and every instance that heartbeat in the last hour
/// with whether it is live and how many mailbox leases it holds — the same from every
/// instance, read from PostgreSQL.
async fn cluster(state: web::Data<AppState>) -> HttpResponse {
    let ttl = state.settings.cluster.lease_ttl.0;
    match crate::leases::instances(&state.pool, ttl).await {
        Ok(instances) => HttpResponse::Ok().json(serde_json::json!({
            "success": true,
            "instance_id": state.settings.instance_id,
            "lease_ttl_seconds": ttl.as_secs(),
            "instances": instances,
        })),
        Err(e) => HttpResponse::ServiceUnavailable().json(serde_json::json!({
            "success": false,
            "instance_id": state.settings.instance_id,
            "error": e.to_string(),
        })),
    }
}

async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    match state.metrics.send(RenderMetrics).await {
        Ok(text) => HttpResponse::Ok()
            .content_type("text/plain; version=0.0.4; charset=utf-8")
            .body(text),
        Err(_) => unavailable("metrics actor"),
    }
}

async fn queue_status(state: web::Data<AppState>) -> HttpResponse {
    match state.supervisor.send(GetQueueStatus).await {
        Ok(r) if r.success => HttpResponse::Ok().json(r),
        Ok(r) => HttpResponse::ServiceUnavailable().json(r),
        Err(_) => unavailable("supervisor"),
    }
}
