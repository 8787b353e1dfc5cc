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
use crate::actors::metrics::{GetHealth, IsReady, MetricsActor, RenderMetrics};
use crate::actors::supervisor::{
    ChildId, EditTenant, FindChild, GetQueueStatus, Reload, SinceTick, Supervisor,
};
use crate::attachments::{AttachmentError, AttachmentStore, ByteRange};
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
        .route("/livez", web::get().to(livez))
        .route("/readyz", web::get().to(readyz))
        .route("/metrics", web::get().to(metrics))
        .route("/api/rabbitmq/status", web::get().to(queue_status))
        .route("/api/mailboxes", web::get().to(mailboxes))
        .route("/api/cluster", web::get().to(cluster))
        .route("/api/dlq", web::get().to(dlq_list))
        .route("/api/dlq/replay", web::post().to(dlq_replay))
        .route("/api/attachments/{id}", web::get().to(attachment))
        .route("/api/config/reload", web::post().to(config_reload))
        .route(
            "/api/tenants/{tenant}/{section}/{id}",
            web::put().to(tenant_entry_put),
        )
        .route(
            "/api/tenants/{tenant}/{section}/{id}",
            web::delete().to(tenant_entry_delete),
        )
        .route("/api/openapi.json", web::get().to(openapi))
        .configure(crate::dashboard::routes);
    // Any other method on these paths: 405 with `Allow` (RFC 9110), not actix's 404 (`route`
    // puts the method guard on the resource itself, so a wrong method finds no resource).
    for &(path, allow) in ALLOWED_METHODS {
        cfg.route(path, web::route().to(move || method_not_allowed(allow)));
    }
}

/// The methods each path of [`routes`] answers.
const ALLOWED_METHODS: &[(&str, &str)] = &[
    ("/health", "GET"),
    ("/livez", "GET"),
    ("/readyz", "GET"),
    ("/metrics", "GET"),
    ("/api/rabbitmq/status", "GET"),
    ("/api/mailboxes", "GET"),
    ("/api/cluster", "GET"),
    ("/api/dlq", "GET"),
    ("/api/dlq/replay", "POST"),
    ("/api/attachments/{id}", "GET"),
    ("/api/config/reload", "POST"),
    ("/api/tenants/{tenant}/{section}/{id}", "PUT, DELETE"),
    ("/api/openapi.json", "GET"),
];

async fn method_not_allowed(allow: &'static str) -> HttpResponse {
    HttpResponse::MethodNotAllowed()
        .insert_header(("Allow", allow))
        .json(serde_json::json!({
            "success": false,
            "error": format!("this path answers {allow} only"),
        }))
}

/// `GET /api/openapi.json`: the OpenAPI 3.1 description of this API (`api/openapi.json`).
async fn openapi() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(include_str!("../api/openapi.json"))
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

/// `PUT /api/tenants/{tenant}/{providers|mailboxes}/{id}`: the body (a JSON object with a
/// tenant file's keys for that entry) becomes the entry in the tenant's file, which is
/// checked, written and applied as a reload.
async fn tenant_entry_put(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<(String, String, String)>,
    body: Result<web::Bytes, actix_web::Error>,
) -> HttpResponse {
    if let Some(refusal) = refuse_unauthorized(&state, &req) {
        return refusal;
    }
    let body = match body {
        Ok(b) => b,
        Err(e) => return bad_request(&e, "a definition is a small JSON object (at most 256 KiB)"),
    };
    let definition: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return HttpResponse::BadRequest().json(serde_json::json!({
                "success": false,
                "error": format!("the body is not JSON: {e}"),
            }))
        }
    };
    edit_tenant(&state, path.into_inner(), Some(definition)).await
}

/// `DELETE /api/tenants/{tenant}/{providers|mailboxes}/{id}`: the entry removed from the
/// tenant's file, which is then applied as a reload.
async fn tenant_entry_delete(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<(String, String, String)>,
) -> HttpResponse {
    if let Some(refusal) = refuse_unauthorized(&state, &req) {
        return refusal;
    }
    edit_tenant(&state, path.into_inner(), None).await
}

async fn edit_tenant(
    state: &AppState,
    (tenant, section, id): (String, String, String),
    definition: Option<serde_json::Value>,
) -> HttpResponse {
    use crate::tenant_files::{EditError, Section};
    let error = |e: String| serde_json::json!({"success": false, "error": e});
    let section = match section.as_str() {
        "providers" => Section::Providers,
        "mailboxes" => Section::Mailboxes,
        other => {
            return HttpResponse::NotFound().json(error(format!(
                "no `{other}` in a tenant: use providers or mailboxes"
            )))
        }
    };
    let asked = state
        .supervisor
        .send(EditTenant {
            tenant,
            section,
            id,
            definition,
        })
        .await;
    match asked {
        Ok(Ok(outcome)) if outcome.applied => HttpResponse::Ok().json(serde_json::json!({
            "success": true, "outcome": outcome,
        })),
        Ok(Ok(outcome)) => HttpResponse::UnprocessableEntity().json(serde_json::json!({
            "success": false,
            "error": "the edit was refused: nothing was written and the running configuration stays in force",
            "outcome": outcome,
        })),
        Ok(Err(e @ EditError::NotFound { .. })) => HttpResponse::NotFound().json(error(e.to_string())),
        Ok(Err(e @ EditError::Parse { .. })) => HttpResponse::Conflict().json(error(e.to_string())),
        Ok(Err(e @ EditError::Io { .. })) => {
            tracing::warn!(error = %e, "a tenant file could not be edited");
            HttpResponse::InternalServerError().json(error(e.to_string()))
        }
        Ok(Err(e)) => HttpResponse::BadRequest().json(error(e.to_string())),
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

/// An inbound attachment, by the signed link published in `email.inbound`: streamed, with
/// `ETag` (the content's hash: it never changes) answering `If-None-Match` with 304, one
/// `Range: bytes=…` answered with 206 (or 416), and the file name as RFC 6266 `filename*`.
async fn attachment(
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<String>,
    query: Option<web::Query<AttachmentQuery>>,
) -> HttpResponse {
    let Some(q) = query else {
        return HttpResponse::Forbidden()
            .json(serde_json::json!({"success": false, "error": "a signed link is required"}));
    };
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let refusal =
        |e: AttachmentError| serde_json::json!({"success": false, "error": e.to_string()});
    let etag = format!("\"{id}\"");
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    let checked = state
        .attachments
        .check_link(&id, q.expires, &q.name, &q.mime, &q.sig, now);
    if checked.is_ok() {
        let matches = |list: &str| {
            list.split(',')
                .map(str::trim)
                .any(|t| t == "*" || t.trim_start_matches("W/") == etag)
        };
        if header("if-none-match").is_some_and(matches) {
            return HttpResponse::NotModified()
                .insert_header(("ETag", etag))
                .finish();
        }
    }
    // A range is honoured unless `If-Range` names another version.
    let range = header("range")
        .and_then(ByteRange::parse)
        .filter(|_| header("if-range").is_none_or(|v| v.trim() == etag));
    let opened = match checked {
        Ok(()) => state.attachments.serve(&id, range).await,
        Err(e) => Err(e),
    };
    match opened {
        Ok(opened) => {
            let mime = if q.mime.is_empty() {
                "application/octet-stream".to_string()
            } else {
                q.mime.clone()
            };
            let body = opened
                .body
                .map(|part| part.map(web::Bytes::from).map_err(std::io::Error::other));
            let mut answer = if range.is_some() {
                let mut partial = HttpResponse::PartialContent();
                partial.insert_header((
                    "Content-Range",
                    format!(
                        "bytes {}-{}/{}",
                        opened.served.start,
                        opened.served.end.saturating_sub(1),
                        opened.size
                    ),
                ));
                partial
            } else {
                HttpResponse::Ok()
            };
            answer
                .content_type(mime)
                .insert_header(("Content-Disposition", content_disposition(&q.name)))
                .insert_header(("ETag", etag))
                .insert_header(("Accept-Ranges", "bytes"))
                .body(actix_web::body::SizedStream::new(
                    opened.served.end - opened.served.start,
                    body,
                ))
        }
        Err(AttachmentError::RangeNotSatisfiable { size }) => HttpResponse::RangeNotSatisfiable()
            .insert_header(("Content-Range", format!("bytes */{size}")))
            .json(refusal(AttachmentError::RangeNotSatisfiable { size })),
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

/// `Content-Disposition` for a download named `name` (RFC 6266): an ASCII `filename` (other
/// characters and quoting ones replaced by `_`) for old clients, and the exact name as
/// `filename*=UTF-8''…` percent-encoded (RFC 8187) when it is not plain ASCII.
fn content_disposition(name: &str) -> String {
    let ascii: String = name
        .chars()
        .map(|c| match c {
            ' '..='~' if c != '"' && c != '\\' => c,
            _ => '_',
        })
        .collect();
    if ascii == name {
        return format!("attachment; filename=\"{ascii}\"");
    }
    let encoded: String =
        name.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' => (b as char).to_string(),
                b'!' | b'#' | b'$' | b'&' | b'+' | b'-' | b'.' | b'^' | b'_' | b'`' | b'|'
                | b'~' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
    format!("attachment; filename=\"{ascii}\"; filename*=UTF-8''{encoded}")
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

pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The DLQ actor, while it runs (it needs the RabbitMQ connection).
pub(crate) async fn dlq_actor(state: &AppState) -> Option<Addr<DeadLetterActor>> {
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
    query: Result<web::Query<DlqListQuery>, actix_web::Error>,
) -> HttpResponse {
    if let Some(refusal) = refuse_unauthorized(&state, &req) {
        return refusal;
    }
    let query = match query {
        Ok(q) => q.into_inner(),
        Err(e) => return bad_request(&e, "use queue=<a dead-letter queue>, limit=<n>"),
    };
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
    body: Result<web::Json<ReplayBody>, actix_web::Error>,
) -> HttpResponse {
    if let Some(refusal) = refuse_unauthorized(&state, &req) {
        return refusal;
    }
    let body = match body {
        Ok(b) => b.into_inner(),
        Err(e) => return bad_request(&e, "send a JSON object (Content-Type: application/json)"),
    };
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

/// A request an extractor refused (a query or body that does not parse), as JSON with the
/// extractor's status (400, 413 for a body too large, …) and `hint`.
fn bad_request(e: &actix_web::Error, hint: &str) -> HttpResponse {
    HttpResponse::build(e.as_response_error().status_code()).json(serde_json::json!({
        "success": false,
        "error": format!("{e}; {hint}"),
    }))
}

fn unavailable(what: &str) -> HttpResponse {
    HttpResponse::ServiceUnavailable().json(serde_json::json!({
        "success": false,
        "error": format!("the {what} is not running; the supervisor restarts it"),
    }))
}

/// The mailboxes the other instances fetch, from `mailbox_health`; none when PostgreSQL does
/// not answer within a second (the database component then says why).
pub(crate) async fn other_mailboxes(
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

/// How long `/livez` waits for the supervisor, and how old its last tick may be.
const WEDGED_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

/// `GET /livez`: 200 while the actors' thread runs (the supervisor answers and ran its tick
/// within [`WEDGED_AFTER`]); 503 when it is stuck — restarting the process is what helps.
async fn livez(state: web::Data<AppState>) -> HttpResponse {
    let asked = tokio::time::timeout(WEDGED_AFTER, state.supervisor.send(SinceTick)).await;
    match asked {
        Ok(Ok(since)) if since < WEDGED_AFTER => {
            HttpResponse::Ok().json(serde_json::json!({"status": "alive"}))
        }
        Ok(Ok(since)) => HttpResponse::ServiceUnavailable().json(serde_json::json!({
            "status": "wedged",
            "error": format!("the supervisor last ran {:.1} s ago", since.as_secs_f64()),
        })),
        _ => HttpResponse::ServiceUnavailable().json(serde_json::json!({
            "status": "wedged",
            "error": "the supervisor does not answer",
        })),
    }
}

/// `GET /readyz`: 200 when RabbitMQ and PostgreSQL are both reachable, else 503.
async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    match tokio::time::timeout(WEDGED_AFTER, state.metrics.send(IsReady)).await {
        Ok(Ok(true)) => HttpResponse::Ok().json(serde_json::json!({"status": "ready"})),
        _ => HttpResponse::ServiceUnavailable().json(serde_json::json!({
            "status": "not ready",
            "error": "RabbitMQ or PostgreSQL is not reachable; /health says which",
        })),
    }
}

async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    let mut text = match state.metrics.send(RenderMetrics).await {
        Ok(text) => text,
        Err(_) => return unavailable("metrics actor"),
    };
    text.push_str(&build_and_process_metrics());
    let stats = tokio::time::timeout(WEDGED_AFTER, state.supervisor.send(GetQueueStatus)).await;
    if let Ok(Ok(stats)) = stats {
        if stats.success {
            text.push_str(&queue_metrics(&stats));
        }
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(text)
}

/// `mailbridge_build_info{version}` and the process's CPU time, resident memory and open file
/// descriptors (Prometheus' `process_*` names), read from `/proc/self`.
fn build_and_process_metrics() -> String {
    let mut out = format!(
        "# TYPE mailbridge_build_info gauge\nmailbridge_build_info{{version=\"{}\"}} 1\n",
        env!("CARGO_PKG_VERSION")
    );
    // utime and stime, fields 14 and 15, in USER_HZ (100 a second on Linux); the command
    // name in parentheses may hold spaces, so count from after it.
    let cpu = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let ticks = |i: usize| fields.get(i)?.parse::<f64>().ok();
            Some((ticks(11)? + ticks(12)?) / 100.0)
        });
    if let Some(cpu) = cpu {
        out.push_str(&format!(
            "# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total {cpu}\n"
        ));
    }
    let rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let kb = s.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
            kb.trim().trim_end_matches("kB").trim().parse::<u64>().ok()
        });
    if let Some(kb) = rss {
        out.push_str(&format!(
            "# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes {}\n",
            kb * 1024
        ));
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        out.push_str(&format!(
            "# TYPE process_open_fds gauge\nprocess_open_fds {}\n",
            fds.count()
        ));
    }
    out
}

/// The public queues' depth and consumers (`mailbridge_queue_messages{queue}`,
/// `mailbridge_queue_consumers{queue}`), as `GET /api/rabbitmq/status` reads them.
fn queue_metrics(stats: &crate::domain::QueueStatusResponse) -> String {
    let mut out = String::from("# TYPE mailbridge_queue_messages gauge\n");
    for (q, s) in &stats.queues {
        out.push_str(&format!(
            "mailbridge_queue_messages{{queue=\"{q}\"}} {}\n",
            s.message_count
        ));
    }
    out.push_str("# TYPE mailbridge_queue_consumers gauge\n");
    for (q, s) in &stats.queues {
        out.push_str(&format!(
            "mailbridge_queue_consumers{{queue=\"{q}\"}} {}\n",
            s.consumer_count
        ));
    }
    out
}

async fn queue_status(state: web::Data<AppState>) -> HttpResponse {
    match state.supervisor.send(GetQueueStatus).await {
        Ok(r) if r.success => HttpResponse::Ok().json(r),
        Ok(r) => HttpResponse::ServiceUnavailable().json(r),
        Err(_) => unavailable("supervisor"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_ascii_file_names_are_given_as_filename_star() {
        assert_eq!(
            content_disposition("report 2026.pdf"),
            "attachment; filename=\"report 2026.pdf\""
        );
        assert_eq!(
            content_disposition("Übersicht \"Q4\".pdf"),
            "attachment; filename=\"_bersicht _Q4_.pdf\"; \
             filename*=UTF-8''%C3%9Cbersicht%20%22Q4%22.pdf"
        );
    }
}
