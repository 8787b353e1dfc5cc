//! The operator dashboard (issue 14): server-rendered HTML pages behind the admin token.
//!
//! `/login` takes the admin token and sets the `mb_admin` cookie (`HttpOnly`,
//! `SameSite=Strict`) to a value derived from it (an HMAC of the token: the cookie is not the
//! bearer token of the admin API). Every page asks the actor that owns its answer, as the
//! JSON API does, or reads PostgreSQL with bounded, parameterized queries: `/` (queues with
//! rate charts, providers), `/ui/mailboxes` (filtered, a page at a time), `/ui/outbox` (search)
//! and `/ui/outbox/email` (one email's history), `/ui/dlq` (browse, replay), `/ui/config` (the
//! loaded configuration without secrets, the last reload's diff). Every value is HTML-escaped;
//! the only script is inline (the queue charts, the replay confirmations) and the pages forbid
//! any other (`Content-Security-Policy`). A POST must carry the session cookie, the form token
//! derived from it, and (when the browser says one) an `Origin` of this host.

use std::fmt::Write as _;
use std::time::Duration;

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;

use crate::actors::dlq::{ListDeadLetters, ReplayDeadLetters};
use crate::actors::metrics::{CounterSums, GetHealth, GetProviderCounts, ListMailboxes};
use crate::actors::supervisor::{GetQueueStatus, LastReload};
use crate::dlq::Selection;
use crate::domain::{ComponentHealth, ComponentState};
use crate::http::{constant_time_eq, other_mailboxes, AppState};
use crate::settings::Secret;

/// The session cookie.
const COOKIE: &str = "mb_admin";
/// How long a page waits for an actor or PostgreSQL.
const WAIT: Duration = Duration::from_secs(10);
/// Rows of a page of the outbox search.
const OUTBOX_PAGE: i64 = 50;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/", web::get().to(overview))
        .route("/login", web::get().to(login_form))
        .route("/login", web::post().to(login))
        .route("/logout", web::post().to(logout))
        .route("/ui/api/queues", web::get().to(queue_sample))
        .route("/ui/mailboxes", web::get().to(mailboxes))
        .route("/ui/outbox", web::get().to(outbox))
        .route("/ui/outbox/email", web::get().to(email))
        .route("/ui/dlq", web::get().to(dlq))
        .route("/ui/dlq/replay", web::post().to(dlq_replay))
        .route("/ui/config", web::get().to(config));
}

// ---------------------------------------------------------------------------------------
// Escaping and small helpers.

/// `s` as HTML text or attribute value (quoted with `"`).
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A query string from pairs (values percent-encoded).
fn query(pairs: &[(&str, &str)]) -> String {
    let mut q = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs.iter().filter(|(_, v)| !v.is_empty()) {
        q.append_pair(k, v);
    }
    q.finish()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// A value derived from the admin token for one purpose (the session cookie, the form token).
fn derive(token: &Secret, purpose: &str) -> String {
    use aws_lc_rs::hmac;
    let key = hmac::Key::new(hmac::HMAC_SHA256, token.expose().as_bytes());
    hex(hmac::sign(&key, format!("mailbridge dashboard {purpose}").as_bytes()).as_ref())
}

fn text_of(v: Option<&serde_json::Value>) -> String {
    match v {
        None | Some(serde_json::Value::Null) => String::new(),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
    }
}

fn time_of(t: Option<time::OffsetDateTime>) -> String {
    t.map(crate::outbound::rfc3339).unwrap_or_default()
}

fn state_badge(s: &str) -> String {
    let class = match s {
        "ok" | "sent" | "running" | "connected" | "published" => "ok",
        "down" | "failed" | "degraded" | "disconnected" | "dead-lettered" => "bad",
        _ => "warn",
    };
    format!("<span class=\"badge {class}\">{}</span>", esc(s))
}

fn empty_as_none(s: &Option<String>) -> Option<String> {
    s.as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

// ---------------------------------------------------------------------------------------
// Sessions.

/// The answer given instead of a page (boxed: it is large).
type Refusal = Box<HttpResponse>;

/// A logged-in request: the form token its forms carry.
struct Session {
    csrf: String,
}

/// The session of `req`, or the answer to give instead: 403 when the admin token is not
/// configured, else (no or a wrong cookie) a redirect to `/login` — or 401 for `api`.
fn session(state: &AppState, req: &HttpRequest, api: bool) -> Result<Session, Refusal> {
    let Some(token) = &state.admin_token else {
        return Err(Box::new(disabled(state)));
    };
    let want = derive(token, "session");
    match cookie(req, COOKIE) {
        Some(v) if constant_time_eq(v.as_bytes(), want.as_bytes()) => Ok(Session {
            csrf: derive(token, "form"),
        }),
        _ if api => Err(Box::new(HttpResponse::Unauthorized().json(
            serde_json::json!({"success": false, "error": "log in at /login"}),
        ))),
        _ => Err(Box::new(see_other("/login"))),
    }
}

fn disabled(state: &AppState) -> HttpResponse {
    let body = format!(
        "<h1>Dashboard disabled</h1><p>The admin endpoints are disabled: set the environment \
         variable <code>{}</code> to a token and restart the service.</p>",
        esc(&state.settings.http.admin_token_env)
    );
    html(HttpResponse::Forbidden(), "Disabled", None, &body)
}

fn see_other(to: &str) -> HttpResponse {
    HttpResponse::SeeOther()
        .insert_header(("Location", to))
        .insert_header(("Cache-Control", "no-store"))
        .finish()
}

fn cookie(req: &HttpRequest, name: &str) -> Option<String> {
    req.headers()
        .get_all("cookie")
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// A POST from a page of this host: no `Origin` (or `Referer`) of another one.
fn same_origin(req: &HttpRequest) -> bool {
    let info = req.connection_info();
    let host = info.host();
    let from = req
        .headers()
        .get("origin")
        .or_else(|| req.headers().get("referer"))
        .map(|v| v.to_str().unwrap_or("null"));
    match from {
        None => true,
        Some(o) => url::Url::parse(o).ok().is_some_and(|u| {
            let origin_host = match (u.host_str(), u.port()) {
                (Some(h), Some(p)) => format!("{h}:{p}"),
                (Some(h), None) => h.to_string(),
                _ => return false,
            };
            origin_host.eq_ignore_ascii_case(host)
        }),
    }
}

/// The fields of a urlencoded form, repeated names kept.
fn form_fields(body: &[u8]) -> Vec<(String, String)> {
    url::form_urlencoded::parse(body).into_owned().collect()
}

fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// A POST's session: the cookie, the form token and the origin all check out.
fn post_session(
    state: &AppState,
    req: &HttpRequest,
    fields: &[(String, String)],
) -> Result<Session, Refusal> {
    let s = session(state, req, false)?;
    let given = field(fields, "csrf").unwrap_or("");
    if !same_origin(req) || !constant_time_eq(given.as_bytes(), s.csrf.as_bytes()) {
        return Err(Box::new(html(
            HttpResponse::Forbidden(),
            "Refused",
            Some(&s),
            "<h1>Refused</h1><p>The form did not come from this dashboard (wrong origin or \
             form token). Reload the page and try again.</p>",
        )));
    }
    Ok(s)
}

// ---------------------------------------------------------------------------------------
// Layout.

const CSS: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#222;background:#f6f7f9}\
nav{background:#223;padding:8px 16px;display:flex;gap:16px;align-items:center}\
nav a{color:#dde;text-decoration:none}nav a:hover{color:#fff}nav form{margin-left:auto}\
main{padding:16px 24px}h1{font-size:20px;margin:8px 0 12px}h2{font-size:16px;margin:20px 0 8px}\
table{border-collapse:collapse;background:#fff;margin-bottom:12px}\
th,td{border:1px solid #dde;padding:4px 8px;text-align:left;vertical-align:top}\
th{background:#eef}td.num{text-align:right}td.err{max-width:420px;word-break:break-word;color:#933}\
.badge{padding:1px 6px;border-radius:8px;font-size:12px}.ok{background:#d4f4d4}\
.bad{background:#f8d0d0}.warn{background:#f7eac0}pre{background:#fff;border:1px solid #dde;\
padding:8px;overflow:auto;max-height:480px}form.filter{margin-bottom:12px}\
form.filter input,form.filter select{margin-right:8px}.notice{background:#fff8d0;\
border:1px solid #ddb;padding:8px;margin-bottom:12px}svg.spark{background:#fafbff;\
border:1px solid #dde;vertical-align:middle}svg.spark polyline{fill:none;stroke:#36c;stroke-width:1.5}\
.muted{color:#777}";

/// A complete page; `session` adds the navigation (with its logout form).
fn html(
    mut builder: actix_web::HttpResponseBuilder,
    title: &str,
    session: Option<&Session>,
    body: &str,
) -> HttpResponse {
    let nav = match session {
        Some(s) => format!(
            "<nav><a href=\"/\">Overview</a><a href=\"/ui/mailboxes\">Mailboxes</a>\
             <a href=\"/ui/outbox\">Outbox</a><a href=\"/ui/dlq\">Dead letters</a>\
             <a href=\"/ui/config\">Configuration</a>\
             <form method=\"post\" action=\"/logout\"><input type=\"hidden\" name=\"csrf\" \
             value=\"{}\"><button id=\"logout\">Log out</button></form></nav>",
            esc(&s.csrf)
        ),
        None => "<nav><a href=\"/\">mailbridge</a></nav>".to_string(),
    };
    let page = format!(
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>{} · mailbridge</title><style>{CSS}</style></head><body>{nav}<main>{body}</main>\
         </body></html>",
        esc(title)
    );
    builder
        .content_type("text/html; charset=utf-8")
        .insert_header(("Cache-Control", "no-store"))
        .insert_header(("X-Content-Type-Options", "nosniff"))
        .insert_header(("Referrer-Policy", "same-origin"))
        .insert_header((
            "Content-Security-Policy",
            "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; \
             connect-src 'self'; img-src 'self' data:; form-action 'self'; \
             frame-ancestors 'none'; base-uri 'none'",
        ))
        .body(page)
}

fn ok_page(title: &str, s: &Session, body: &str) -> HttpResponse {
    html(HttpResponse::Ok(), title, Some(s), body)
}

fn unavailable(s: &Session, what: &str) -> HttpResponse {
    html(
        HttpResponse::ServiceUnavailable(),
        "Unavailable",
        Some(s),
        &format!(
            "<h1>Unavailable</h1><p>{} did not answer; try again in a moment.</p>",
            esc(what)
        ),
    )
}

// ---------------------------------------------------------------------------------------
// Login.

#[derive(Deserialize)]
struct LoginQuery {
    #[serde(default)]
    failed: bool,
}

async fn login_form(state: web::Data<AppState>, q: Option<web::Query<LoginQuery>>) -> HttpResponse {
    if state.admin_token.is_none() {
        return disabled(&state);
    }
    login_page(q.is_some_and(|q| q.failed))
}

fn login_page(failed: bool) -> HttpResponse {
    let notice = if failed {
        "<p class=\"notice\" id=\"login-error\">That is not the admin token.</p>"
    } else {
        ""
    };
    let body = format!(
        "<h1>Log in</h1>{notice}<form method=\"post\" action=\"/login\">\
         <label>Admin token <input type=\"password\" name=\"token\" id=\"token\" \
         autocomplete=\"current-password\" autofocus></label> \
         <button type=\"submit\" id=\"login\">Log in</button></form>\
         <p class=\"muted\">The token of the admin API (the environment variable named by \
         <code>[http] admin_token_env</code>).</p>"
    );
    let builder = if failed {
        HttpResponse::Unauthorized()
    } else {
        HttpResponse::Ok()
    };
    html(builder, "Log in", None, &body)
}

async fn login(state: web::Data<AppState>, req: HttpRequest, body: web::Bytes) -> HttpResponse {
    let Some(token) = &state.admin_token else {
        return disabled(&state);
    };
    let fields = form_fields(&body);
    let given = field(&fields, "token").unwrap_or("");
    if !same_origin(&req) || !constant_time_eq(given.as_bytes(), token.expose().as_bytes()) {
        return login_page(true);
    }
    let secure = if req.connection_info().scheme() == "https" {
        "; Secure"
    } else {
        ""
    };
    HttpResponse::SeeOther()
        .insert_header(("Location", "/"))
        .insert_header(("Cache-Control", "no-store"))
        .insert_header((
            "Set-Cookie",
            format!(
                "{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/{secure}",
                derive(token, "session")
            ),
        ))
        .finish()
}

async fn logout(state: web::Data<AppState>, req: HttpRequest, body: web::Bytes) -> HttpResponse {
    if let Err(refusal) = post_session(&state, &req, &form_fields(&body)) {
        return *refusal;
    }
    HttpResponse::SeeOther()
        .insert_header(("Location", "/login"))
        .insert_header((
            "Set-Cookie",
            format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"),
        ))
        .finish()
}

// ---------------------------------------------------------------------------------------
// Overview: queues and providers.

/// The counters a queue's rate is read from, on this instance: `(queue, counter, label
/// value, counts what goes in)`; the other direction follows from the depth.
fn rate_counters(state: &AppState) -> Vec<(String, usize, &'static str, bool)> {
    let q = &state.settings.queues;
    vec![
        (q.send.clone(), 0, "", false),
        (q.result.clone(), 0, "", true),
        (q.inbound.clone(), 1, "", true),
        (q.sync_user.clone(), 2, "", false),
        (q.send_dlq(), 3, "send_dlq", true),
        (q.inbound_dlq(), 3, "inbound_dlq", true),
    ]
}

/// `GET /ui/api/queues`: one sample of the queues for the charts — depth and consumers
/// (RabbitMQ) and the counters their in/out rates are computed from.
async fn queue_sample(state: web::Data<AppState>, req: HttpRequest) -> HttpResponse {
    if let Err(refusal) = session(&state, &req, true) {
        return *refusal;
    }
    let status = tokio::time::timeout(WAIT, state.supervisor.send(GetQueueStatus)).await;
    let sums = state
        .metrics
        .send(CounterSums(vec![
            ("mailbridge_emails_sent_total", ""),
            ("mailbridge_emails_failed_total", ""),
            ("mailbridge_sends_deferred_total", ""),
            ("mailbridge_inbound_published_total", ""),
            ("mailbridge_sync_requests_total", ""),
            ("mailbridge_dead_letters_total", "queue"),
        ]))
        .await
        .unwrap_or_default();
    let total = |i: usize| -> u64 { sums.get(i).map(|m| m.values().sum()).unwrap_or(0) };
    let counters = [
        // Consumed from the send queue / results published: every outcome of an attempt.
        total(0) + total(1) + total(2),
        total(3),
        total(4),
    ];
    let dlq = |name: &str| -> u64 { sums.get(5).and_then(|m| m.get(name)).copied().unwrap_or(0) };
    let mut ins = serde_json::Map::new();
    let mut outs = serde_json::Map::new();
    for (queue, i, which, counts_in) in rate_counters(&state) {
        let n = match which {
            "send_dlq" => dlq(&state.settings.queues.send_dlq()),
            "inbound_dlq" => dlq(&state.settings.queues.inbound_dlq()),
            _ => counters.get(i).copied().unwrap_or(0),
        };
        if counts_in {
            ins.insert(queue, n.into());
        } else {
            outs.insert(queue, n.into());
        }
    }
    let t = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
    let body = match status {
        Ok(Ok(s)) => serde_json::json!({
            "t": t as i64, "success": s.success, "error": s.error,
            "queues": s.queues.iter().map(|(q, v)| (q.clone(), serde_json::json!({
                "depth": v.message_count, "consumers": v.consumer_count, "status": v.status,
            }))).collect::<serde_json::Map<_, _>>(),
            "in": ins, "out": outs,
        }),
        _ => serde_json::json!({"t": t as i64, "success": false,
            "error": "the supervisor did not answer", "queues": {}, "in": ins, "out": outs}),
    };
    HttpResponse::Ok()
        .insert_header(("Cache-Control", "no-store"))
        .json(body)
}

const CHART_JS: &str = r#"
const hist = {};
function spark(svg, vals) {
  const w = 120, h = 26, max = Math.max(1e-9, ...vals);
  const pts = vals.map((v, k) => (vals.length < 2 ? 0 : k * w / (vals.length - 1)).toFixed(1)
    + ',' + (h - 2 - (v / max) * (h - 4)).toFixed(1)).join(' ');
  svg.querySelector('polyline').setAttribute('points', pts);
  svg.setAttribute('data-points', String(vals.length));
}
function rates(h) {
  const ins = [], outs = [];
  for (let k = 1; k < h.length; k++) {
    const a = h[k - 1], b = h[k], dt = (b.t - a.t) / 1000;
    if (dt <= 0) continue;
    const dd = (b.d - a.d) / dt;
    let i, o;
    if (a.o != null && b.o != null) { o = (b.o - a.o) / dt; i = o + dd; }
    else if (a.i != null && b.i != null) { i = (b.i - a.i) / dt; o = i - dd; }
    else { i = Math.max(dd, 0); o = Math.max(-dd, 0); }
    ins.push(Math.max(i, 0)); outs.push(Math.max(o, 0));
  }
  return [ins, outs];
}
async function poll() {
  let s;
  try {
    const r = await fetch('/ui/api/queues', {credentials: 'same-origin', cache: 'no-store'});
    if (!r.ok) return;
    s = await r.json();
  } catch (e) { return; }
  document.getElementById('queues-error').textContent = s.success ? '' : (s.error || '');
  for (const row of document.querySelectorAll('tr[data-q]')) {
    const q = row.getAttribute('data-q'), v = s.queues[q];
    if (!v) continue;
    const h = hist[q] || (hist[q] = []);
    h.push({t: s.t, d: v.depth, i: s.in[q], o: s.out[q]});
    if (h.length > 61) h.shift();
    row.querySelector('.depth').textContent = v.depth;
    row.querySelector('.consumers').textContent = v.consumers;
    const [ins, outs] = rates(h);
    spark(row.querySelector('svg.depth-chart'), h.map(x => x.d));
    spark(row.querySelector('svg.in-chart'), ins);
    spark(row.querySelector('svg.out-chart'), outs);
    row.querySelector('.in-now').textContent = ins.length ? ins[ins.length - 1].toFixed(1) + '/s' : '';
    row.querySelector('.out-now').textContent = outs.length ? outs[outs.length - 1].toFixed(1) + '/s' : '';
  }
}
poll();
setInterval(poll, 2000);
"#;

fn spark_svg(class: &str) -> String {
    format!(
        "<svg class=\"spark {class}\" width=\"120\" height=\"26\" viewBox=\"0 0 120 26\" \
         data-points=\"0\"><polyline points=\"\"/></svg>"
    )
}

fn component_row(name: &str, h: &ComponentHealth) -> String {
    format!(
        "<tr><td>{}</td><td>{}</td><td class=\"err\">{}</td></tr>",
        esc(name),
        state_badge(h.status.as_str()),
        esc(h.last_error.as_deref().unwrap_or(""))
    )
}

/// The configuration in force — the supervisor's, as reloaded (the HTTP state holds the one
/// of the start) — and the last reload that changed something.
async fn current(
    state: &AppState,
) -> (
    std::sync::Arc<crate::settings::Settings>,
    Option<(String, crate::actors::supervisor::ReloadOutcome)>,
) {
    match tokio::time::timeout(WAIT, state.supervisor.send(LastReload)).await {
        Ok(Ok(answer)) => answer,
        _ => (state.settings.clone(), None),
    }
}

async fn overview(state: web::Data<AppState>, req: HttpRequest) -> HttpResponse {
    let s = match session(&state, &req, false) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let (settings, _) = current(&state).await;
    let ask = GetHealth {
        instance_id: state.settings.instance_id.clone(),
        others: Default::default(),
    };
    let Ok(health) = state.metrics.send(ask).await else {
        return unavailable(&s, "the metrics actor");
    };
    let counts = state
        .metrics
        .send(GetProviderCounts)
        .await
        .unwrap_or_default();
    let queues = tokio::time::timeout(WAIT, state.supervisor.send(GetQueueStatus)).await;
    let mut b = String::new();
    let _ = write!(
        b,
        "<h1>Overview</h1><p>Instance <b id=\"instance\">{}</b>, version {}: {}</p>\
         <table><tr><th>component</th><th>state</th><th>last error</th></tr>{}{}{}</table>",
        esc(&state.settings.instance_id),
        env!("CARGO_PKG_VERSION"),
        state_badge(health.status),
        component_row("RabbitMQ", &health.components.rabbitmq),
        component_row("PostgreSQL", &health.components.database),
        component_row("configuration", &health.components.config),
    );

    b.push_str(
        "<h2>Queues</h2><p class=\"muted\">Charts: the last two minutes, sampled every 2 s \
         while this page is open; rates from this instance's counters and the depth.</p>\
         <p class=\"err\" id=\"queues-error\"></p><table id=\"queues\"><tr><th>queue</th>\
         <th>depth</th><th>consumers</th><th>state</th><th>depth</th><th>in</th><th>out</th></tr>",
    );
    match &queues {
        Ok(Ok(q)) if q.success => {
            for (name, st) in &q.queues {
                let _ = write!(
                    b,
                    "<tr data-q=\"{n}\"><td>{n}</td><td class=\"num depth\">{}</td>\
                     <td class=\"num consumers\">{}</td><td>{}</td><td>{}</td>\
                     <td>{} <span class=\"in-now\"></span></td><td>{} <span class=\"out-now\">\
                     </span></td></tr>",
                    st.message_count,
                    st.consumer_count,
                    state_badge(st.status),
                    spark_svg("depth-chart"),
                    spark_svg("in-chart"),
                    spark_svg("out-chart"),
                    n = esc(name),
                );
            }
        }
        Ok(Ok(q)) => {
            let _ = write!(
                b,
                "<tr><td colspan=\"7\" class=\"err\">{}</td></tr>",
                esc(q.error.as_deref().unwrap_or("RabbitMQ is not connected"))
            );
        }
        _ => b.push_str(
            "<tr><td colspan=\"7\" class=\"err\">the supervisor did not answer</td></tr>",
        ),
    }
    b.push_str("</table>");

    b.push_str(
        "<h2>Providers</h2><p class=\"muted\">Counts since this instance started.</p>\
         <table id=\"providers\"><tr><th>provider</th><th>tenant</th><th>kind</th><th>state</th>\
         <th>sent</th><th>failed attempts</th><th>retries</th><th>mean send latency</th>\
         <th>rate limits</th><th>parked by a rate limit</th><th>last error</th></tr>",
    );
    for tenant in &settings.tenants {
        for p in &tenant.providers {
            let h = health.components.providers.get(&p.id);
            let c = counts.get(&p.id).cloned().unwrap_or_default();
            let latency = if c.timed > 0 {
                format!("{:.1} ms", c.seconds * 1000.0 / c.timed as f64)
            } else {
                "—".into()
            };
            let limits = [
                p.limits.per_second.map(|r| format!("{r}/s")),
                p.limits.per_day.map(|r| format!("{r}/day")),
                p.limits.max_in_flight.map(|r| format!("{r} in flight")),
                Some(format!("{} connections", p.max_connections)),
            ]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(", ");
            let _ = write!(
                b,
                "<tr data-provider=\"{}\"><td>{} <span class=\"muted\">{}</span></td><td>{}</td>\
                 <td>{}</td><td>{}</td><td class=\"num sent\">{}</td><td class=\"num\">{}</td>\
                 <td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td>\
                 <td class=\"num\">{}</td><td class=\"err\">{}</td></tr>",
                esc(&p.id),
                esc(&p.id),
                esc(&p.name),
                esc(&tenant.id),
                esc(p.config.kind()),
                state_badge(h.map(|h| h.status.as_str()).unwrap_or("starting")),
                c.sent,
                c.failed,
                c.retries,
                latency,
                esc(&limits),
                c.deferred,
                esc(h.and_then(|h| h.last_error.as_deref()).unwrap_or("")),
            );
        }
    }
    b.push_str("</table>");
    let _ = write!(b, "<script>{CHART_JS}</script>");
    ok_page("Overview", &s, &b)
}

// ---------------------------------------------------------------------------------------
// Mailboxes.

#[derive(Deserialize, Default)]
struct MailboxQuery {
    status: Option<String>,
    tenant: Option<String>,
    #[serde(default)]
    offset: usize,
    limit: Option<usize>,
}

async fn mailboxes(
    state: web::Data<AppState>,
    req: HttpRequest,
    q: Option<web::Query<MailboxQuery>>,
) -> HttpResponse {
    let s = match session(&state, &req, false) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let q = q.map(|q| q.into_inner()).unwrap_or_default();
    let (settings, _) = current(&state).await;
    let status = match q.status.as_deref().unwrap_or("") {
        "ok" => Some(ComponentState::Ok),
        "down" => Some(ComponentState::Down),
        "starting" => Some(ComponentState::Starting),
        _ => None,
    };
    let tenant = empty_as_none(&q.tenant);
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let ask = ListMailboxes {
        others: other_mailboxes(&state).await,
        status,
        tenant: tenant.clone(),
        offset: q.offset,
        limit,
    };
    let Ok(page) = state.metrics.send(ask).await else {
        return unavailable(&s, "the metrics actor");
    };
    let status_str = status.map(|s| s.as_str()).unwrap_or("");
    let tenant_str = tenant.as_deref().unwrap_or("");
    let mut b = String::from("<h1>Mailboxes</h1>");
    let _ = write!(
        b,
        "<p id=\"mailbox-counts\">{} — ok {}, down {}, starting {}</p>",
        if tenant_str.is_empty() {
            "All tenants".to_string()
        } else {
            format!("Tenant {}", esc(tenant_str))
        },
        page.counts.get("ok").unwrap_or(&0),
        page.counts.get("down").unwrap_or(&0),
        page.counts.get("starting").unwrap_or(&0),
    );
    b.push_str("<form class=\"filter\" method=\"get\" action=\"/ui/mailboxes\">Tenant <select name=\"tenant\"><option value=\"\">all</option>");
    for t in &settings.tenants {
        let _ = write!(
            b,
            "<option value=\"{id}\"{}>{id} ({})</option>",
            if t.id == tenant_str { " selected" } else { "" },
            esc(&t.name),
            id = esc(&t.id)
        );
    }
    b.push_str("</select> State <select name=\"status\">");
    for (v, label) in [
        ("", "any"),
        ("ok", "ok"),
        ("down", "down"),
        ("starting", "starting"),
    ] {
        let _ = write!(
            b,
            "<option value=\"{v}\"{}>{label}</option>",
            if v == status_str { " selected" } else { "" }
        );
    }
    let _ = write!(
        b,
        "</select> Per page <input name=\"limit\" size=\"4\" value=\"{limit}\"> \
         <button id=\"filter\">Show</button></form>"
    );
    let _ = write!(
        b,
        "<p>{} matching; showing {}–{}.</p>",
        page.total,
        if page.mailboxes.is_empty() {
            0
        } else {
            page.offset + 1
        },
        page.offset + page.mailboxes.len()
    );
    b.push_str(
        "<table id=\"mailboxes\"><tr><th>mailbox</th><th>tenant</th><th>protocol</th>\
         <th>state</th><th>last sync</th><th>last error</th><th>instance</th><th>endpoint</th></tr>",
    );
    for m in &page.mailboxes {
        let d = &m.health.details;
        let _ = write!(
            b,
            "<tr data-mailbox=\"{id}\"><td>{id}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td class=\"err\">{}</td><td>{}</td><td>{}</td></tr>",
            esc(&text_of(d.get("tenant"))),
            esc(&text_of(d.get("protocol"))),
            state_badge(m.health.status.as_str()),
            esc(&text_of(d.get("last_sync"))),
            esc(m.health.last_error.as_deref().unwrap_or("")),
            esc(&d
                .get("instance")
                .map(|v| text_of(Some(v)))
                .unwrap_or_else(|| state.settings.instance_id.clone())),
            esc(&text_of(d.get("endpoint"))),
            id = esc(&m.id),
        );
    }
    b.push_str("</table>");
    let link = |offset: usize| {
        format!(
            "/ui/mailboxes?{}",
            query(&[
                ("tenant", tenant_str),
                ("status", status_str),
                ("offset", &offset.to_string()),
                ("limit", &limit.to_string()),
            ])
        )
    };
    if page.offset > 0 {
        let _ = write!(
            b,
            "<a id=\"prev\" href=\"{}\">← previous</a> ",
            esc(&link(page.offset.saturating_sub(limit)))
        );
    }
    if page.offset + page.mailboxes.len() < page.total {
        let _ = write!(
            b,
            "<a id=\"next\" href=\"{}\">next →</a>",
            esc(&link(page.offset + limit))
        );
    }
    ok_page("Mailboxes", &s, &b)
}

// ---------------------------------------------------------------------------------------
// The outbox.

#[derive(Deserialize, Default)]
struct OutboxQuery {
    tenant: Option<String>,
    message_id: Option<String>,
    recipient: Option<String>,
    status: Option<String>,
    #[serde(default)]
    offset: i64,
}

const OUTBOX_SEARCH_SQL: &str = "SELECT tenant_id, message_id, provider_id, status, attempts,
        retry_count, last_error, recipients, subject, created_at, updated_at
    FROM outbox
    WHERE ($1::text IS NULL OR tenant_id = $1)
      AND ($2::text IS NULL OR starts_with(message_id, $2))
      AND ($3::text IS NULL OR strpos(recipients, lower($3)) > 0)
      AND ($4::text IS NULL OR status = $4)
    ORDER BY created_at DESC, tenant_id, message_id
    LIMIT $5 OFFSET $6";

async fn outbox(
    state: web::Data<AppState>,
    req: HttpRequest,
    q: Option<web::Query<OutboxQuery>>,
) -> HttpResponse {
    let s = match session(&state, &req, false) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let q = q.map(|q| q.into_inner()).unwrap_or_default();
    let tenant = empty_as_none(&q.tenant);
    let message_id = empty_as_none(&q.message_id);
    let recipient = empty_as_none(&q.recipient);
    let status = empty_as_none(&q.status)
        .filter(|s| ["queued", "sending", "retrying", "sent", "failed"].contains(&s.as_str()));
    let offset = q.offset.clamp(0, 1_000_000);
    let mut b = String::from("<h1>Outbox</h1>");
    let v = |o: &Option<String>| esc(o.as_deref().unwrap_or(""));
    let _ = write!(
        b,
        "<form class=\"filter\" method=\"get\" action=\"/ui/outbox\">\
         Tenant <input name=\"tenant\" id=\"f-tenant\" value=\"{}\"> \
         message_id <input name=\"message_id\" id=\"f-message-id\" value=\"{}\" \
         placeholder=\"starts with\"> Recipient <input name=\"recipient\" id=\"f-recipient\" \
         value=\"{}\" placeholder=\"contains\"> Status <select name=\"status\" id=\"f-status\">",
        v(&tenant),
        v(&message_id),
        v(&recipient)
    );
    for st in ["", "queued", "sending", "retrying", "sent", "failed"] {
        let _ = write!(
            b,
            "<option value=\"{st}\"{}>{}</option>",
            if status.as_deref().unwrap_or("") == st {
                " selected"
            } else {
                ""
            },
            if st.is_empty() { "any" } else { st }
        );
    }
    b.push_str("</select> <button id=\"search\">Search</button></form>");

    let rows = async {
        let client = state.pool.get().await.map_err(|e| e.to_string())?;
        client
            .query(
                OUTBOX_SEARCH_SQL,
                &[
                    &tenant,
                    &message_id,
                    &recipient,
                    &status,
                    &(OUTBOX_PAGE + 1),
                    &offset,
                ],
            )
            .await
            .map_err(|e| e.to_string())
    };
    let rows = match tokio::time::timeout(WAIT, rows).await {
        Ok(Ok(rows)) => rows,
        Ok(Err(e)) => {
            let _ = write!(
                b,
                "<p class=\"err\">The outbox could not be read: {}</p>",
                esc(&e)
            );
            return ok_page("Outbox", &s, &b);
        }
        Err(_) => {
            b.push_str("<p class=\"err\">PostgreSQL did not answer within 10 s.</p>");
            return ok_page("Outbox", &s, &b);
        }
    };
    b.push_str(
        "<table id=\"outbox\"><tr><th>tenant</th><th>message_id</th><th>provider</th>\
         <th>recipients</th><th>subject</th><th>status</th><th>attempts</th><th>retries</th>\
         <th>last error</th><th>received</th><th>updated</th></tr>",
    );
    for r in rows.iter().take(OUTBOX_PAGE as usize) {
        let t: String = r.get(0);
        let m: String = r.get(1);
        let st: String = r.get(3);
        let _ = write!(
            b,
            "<tr data-message-id=\"{}\"><td>{}</td><td><a href=\"/ui/outbox/email?{}\">{}</a></td>\
             <td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"err\">{}</td><td>{}</td><td>{}</td></tr>",
            esc(&m),
            esc(&t),
            esc(&query(&[("tenant", &t), ("message_id", &m)])),
            esc(&m),
            esc(&r.get::<_, String>(2)),
            esc(&r.get::<_, Option<String>>(7).unwrap_or_default()),
            esc(&r.get::<_, Option<String>>(8).unwrap_or_default()),
            state_badge(&st),
            r.get::<_, i32>(4),
            r.get::<_, i32>(5),
            esc(&r.get::<_, Option<String>>(6).unwrap_or_default()),
            time_of(r.get(9)),
            time_of(r.get(10)),
        );
    }
    b.push_str("</table>");
    let link = |offset: i64| {
        format!(
            "/ui/outbox?{}",
            query(&[
                ("tenant", tenant.as_deref().unwrap_or("")),
                ("message_id", message_id.as_deref().unwrap_or("")),
                ("recipient", recipient.as_deref().unwrap_or("")),
                ("status", status.as_deref().unwrap_or("")),
                ("offset", &offset.to_string()),
            ])
        )
    };
    if offset > 0 {
        let _ = write!(
            b,
            "<a id=\"prev\" href=\"{}\">← newer</a> ",
            esc(&link((offset - OUTBOX_PAGE).max(0)))
        );
    }
    if rows.len() as i64 > OUTBOX_PAGE {
        let _ = write!(
            b,
            "<a id=\"next\" href=\"{}\">older →</a>",
            esc(&link(offset + OUTBOX_PAGE))
        );
    }
    ok_page("Outbox", &s, &b)
}

#[derive(Deserialize)]
struct EmailQuery {
    tenant: String,
    message_id: String,
}

const EMAIL_ROW_SQL: &str = "SELECT provider_id, user_id, template_id, campaign_id, status,
        attempts, deliveries, last_error, error_class, retry_count, last_reply,
        provider_message_id, rfc_message_id, recipients, subject, uncertain,
        created_at, updated_at, sent_at, result_published_at, dead_lettered_at, next_retry_at,
        claim_owner
    FROM outbox WHERE tenant_id = $1 AND message_id = $2";

const EMAIL_EVENTS_SQL: &str = "SELECT at, event, error, error_class, retry_count, last_reply
    FROM outbox_events WHERE tenant_id = $1 AND message_id = $2 ORDER BY id LIMIT 1000";

const EMAIL_REPLIES_SQL: &str = "SELECT mailbox_id, message_id, published_at
    FROM inbound_published WHERE reply_tenant_id = $1 AND reply_to_message_id = $2
    ORDER BY published_at LIMIT 500";

/// `GET /ui/outbox/email?tenant=…&message_id=…`: one email's row, history and replies.
async fn email(
    state: web::Data<AppState>,
    req: HttpRequest,
    q: Option<web::Query<EmailQuery>>,
) -> HttpResponse {
    let s = match session(&state, &req, false) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let Some(q) = q else {
        return see_other("/ui/outbox");
    };
    let read = async {
        let client = state.pool.get().await.map_err(|e| e.to_string())?;
        let key: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&q.tenant, &q.message_id];
        let row = client
            .query_opt(EMAIL_ROW_SQL, &key)
            .await
            .map_err(|e| e.to_string())?;
        let events = client
            .query(EMAIL_EVENTS_SQL, &key)
            .await
            .map_err(|e| e.to_string())?;
        let replies = client
            .query(EMAIL_REPLIES_SQL, &key)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>((row, events, replies))
    };
    let mut b = format!(
        "<h1>Email <span id=\"email-id\">{}</span></h1><p>Tenant <b>{}</b> · \
         <a href=\"/ui/outbox?{}\">the tenant's outbox</a></p>",
        esc(&q.message_id),
        esc(&q.tenant),
        esc(&query(&[("tenant", &q.tenant)]))
    );
    let (row, events, replies) = match tokio::time::timeout(WAIT, read).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            let _ = write!(
                b,
                "<p class=\"err\">The outbox could not be read: {}</p>",
                esc(&e)
            );
            return ok_page("Email", &s, &b);
        }
        Err(_) => {
            b.push_str("<p class=\"err\">PostgreSQL did not answer within 10 s.</p>");
            return ok_page("Email", &s, &b);
        }
    };
    let Some(r) = row else {
        b.push_str("<p>No such email in the outbox.</p>");
        return html(HttpResponse::NotFound(), "Email", Some(&s), &b);
    };
    let text = |i: usize| esc(&r.get::<_, Option<String>>(i).unwrap_or_default());
    let fields: [(&str, String); 23] = [
        ("status", state_badge(&r.get::<_, String>(4))),
        ("provider", text(0)),
        ("recipients", text(13)),
        ("subject", text(14)),
        ("user_id", text(1)),
        ("template_id", text(2)),
        ("campaign_id", text(3)),
        ("attempts", r.get::<_, i32>(5).to_string()),
        (
            "deliveries since the last outcome",
            r.get::<_, i32>(6).to_string(),
        ),
        ("retries", r.get::<_, i32>(9).to_string()),
        ("last error", text(7)),
        ("error class", text(8)),
        ("last server reply", text(10)),
        ("outcome uncertain", r.get::<_, bool>(15).to_string()),
        ("provider message id", text(11)),
        ("Message-ID", text(12)),
        ("received", time_of(r.get(16))),
        ("updated", time_of(r.get(17))),
        ("sent", time_of(r.get(18))),
        ("result published", time_of(r.get(19))),
        ("dead-lettered", time_of(r.get(20))),
        ("next retry", time_of(r.get(21))),
        ("claimed by", text(22)),
    ];
    b.push_str("<table id=\"email\">");
    for (k, v) in fields {
        let _ = write!(b, "<tr><th>{k}</th><td>{v}</td></tr>");
    }
    b.push_str("</table>");

    // The history: the row's moments and the recorded events, in time order.
    let mut history: Vec<(time::OffsetDateTime, String, String, String)> = Vec::new();
    if let Some(at) = r.get::<_, Option<time::OffsetDateTime>>(16) {
        history.push((at, "received".into(), String::new(), String::new()));
    }
    for e in &events {
        let detail = [
            e.get::<_, Option<i32>>(4)
                .filter(|n| *n > 0)
                .map(|n| format!("retry {n}")),
            e.get::<_, Option<String>>(3).map(|c| format!("class {c}")),
            e.get::<_, Option<String>>(5).map(|r| format!("reply: {r}")),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join("; ");
        history.push((
            e.get(0),
            e.get(1),
            e.get::<_, Option<String>>(2).unwrap_or_default(),
            detail,
        ));
    }
    if let Some(at) = r.get::<_, Option<time::OffsetDateTime>>(18) {
        let id = r.get::<_, Option<String>>(11).unwrap_or_default();
        history.push((
            at,
            "sent".into(),
            String::new(),
            format!("provider id {id}"),
        ));
    }
    if let Some(at) = r.get::<_, Option<time::OffsetDateTime>>(19) {
        history.push((at, "result published".into(), String::new(), String::new()));
    }
    history.sort_by_key(|h| h.0);
    b.push_str(
        "<h2>History</h2><table id=\"history\"><tr><th>when</th><th>what</th><th>error</th>\
         <th>details</th></tr>",
    );
    for (at, what, error, detail) in &history {
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td><td class=\"err\">{}</td><td>{}</td></tr>",
            crate::outbound::rfc3339(*at),
            state_badge(what),
            esc(error),
            esc(detail)
        );
    }
    b.push_str("</table><h2>Replies received</h2>");
    if replies.is_empty() {
        b.push_str("<p id=\"replies\" class=\"muted\">None recorded.</p>");
    } else {
        b.push_str(
            "<table id=\"replies\"><tr><th>received</th><th>mailbox</th><th>Message-ID</th></tr>",
        );
        for r in &replies {
            let _ = write!(
                b,
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                time_of(r.get(2)),
                esc(&r.get::<_, String>(0)),
                esc(&r.get::<_, Option<String>>(1).unwrap_or_default())
            );
        }
        b.push_str("</table>");
    }
    ok_page("Email", &s, &b)
}

// ---------------------------------------------------------------------------------------
// Dead letters.

#[derive(Deserialize, Default)]
struct DlqQuery {
    queue: Option<String>,
    limit: Option<usize>,
}

fn dlq_queue(state: &AppState, asked: Option<&str>) -> String {
    let q = &state.settings.queues;
    match asked {
        Some(a) if a == q.inbound_dlq() => q.inbound_dlq(),
        _ => q.send_dlq(),
    }
}

async fn dlq(
    state: web::Data<AppState>,
    req: HttpRequest,
    q: Option<web::Query<DlqQuery>>,
) -> HttpResponse {
    let s = match session(&state, &req, false) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let q = q.map(|q| q.into_inner()).unwrap_or_default();
    dlq_page(&state, &s, q.queue.as_deref(), q.limit, None).await
}

async fn dlq_page(
    state: &AppState,
    s: &Session,
    queue: Option<&str>,
    limit: Option<usize>,
    notice: Option<String>,
) -> HttpResponse {
    let queue = dlq_queue(state, queue);
    let limit = limit.unwrap_or(100).clamp(1, 1000);
    let Some(actor) = crate::http::dlq_actor(state).await else {
        return unavailable(s, "the DLQ actor (it needs the RabbitMQ connection)");
    };
    let listed = tokio::time::timeout(
        WAIT,
        actor.send(ListDeadLetters {
            queue: queue.clone(),
            limit,
        }),
    )
    .await;
    let entries = match listed {
        Ok(Ok(Ok(e))) => e,
        Ok(Ok(Err(e))) => {
            return html(
                HttpResponse::BadGateway(),
                "Dead letters",
                Some(s),
                &format!("<p class=\"err\">{}</p>", esc(&e)),
            )
        }
        _ => return unavailable(s, "the DLQ actor"),
    };
    let mut b = String::from("<h1>Dead letters</h1>");
    if let Some(n) = notice {
        let _ = write!(b, "<div class=\"notice\" id=\"notice\">{n}</div>");
    }
    b.push_str(
        "<form class=\"filter\" method=\"get\" action=\"/ui/dlq\">Queue <select name=\"queue\">",
    );
    for name in [
        state.settings.queues.send_dlq(),
        state.settings.queues.inbound_dlq(),
    ] {
        let _ = write!(
            b,
            "<option{}>{}</option>",
            if name == queue { " selected" } else { "" },
            esc(&name)
        );
    }
    let _ = write!(
        b,
        "</select> Show <input name=\"limit\" size=\"4\" value=\"{limit}\"> \
         <button>Show</button></form><p id=\"dlq-count\">{} entr{} at the head of {}.</p>",
        entries.len(),
        if entries.len() == 1 { "y" } else { "ies" },
        esc(&queue)
    );
    let inbound = queue == state.settings.queues.inbound_dlq();
    let _ = write!(
        b,
        "<form method=\"post\" action=\"/ui/dlq/replay\" id=\"replay-form\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
         <input type=\"hidden\" name=\"queue\" value=\"{}\">\
         <table id=\"dlq\"><tr><th></th><th>message_id</th><th>tenant</th><th>{}</th>\
         <th>error</th><th>class</th><th>retries</th><th>failed at</th><th></th></tr>",
        esc(&s.csrf),
        esc(&queue),
        if inbound { "mailbox" } else { "last reply" },
    );
    for e in &entries {
        let mid = text_of(e.get("message_id"));
        // An inbound email that did not parse may have no Message-ID: its dedup key then.
        let id = if mid.is_empty() {
            text_of(e.get("dedup_key"))
        } else {
            mid.clone()
        };
        let third = if inbound {
            text_of(e.get("mailbox_id"))
        } else {
            text_of(e.get("last_reply"))
        };
        let tenant = text_of(e.get("tenant_id"));
        let link = if !inbound && !mid.is_empty() && !tenant.is_empty() {
            format!(
                "<a href=\"/ui/outbox/email?{}\">{}</a>",
                esc(&query(&[("tenant", &tenant), ("message_id", &mid)])),
                esc(&mid)
            )
        } else {
            esc(&id)
        };
        let button = if id.is_empty() {
            String::new()
        } else {
            format!(
                "<button class=\"replay-one\" name=\"one\" value=\"{v}\" data-id=\"{v}\" \
                 onclick=\"return confirm('Replay this entry to its queue?')\">Replay</button>",
                v = esc(&id)
            )
        };
        let _ = write!(
            b,
            "<tr data-id=\"{v}\"><td>{}</td><td>{link}</td><td>{}</td><td>{}</td>\
             <td class=\"err\">{}</td><td>{}</td><td class=\"num\">{}</td><td>{}</td><td>{button}</td></tr>",
            if id.is_empty() {
                String::new()
            } else {
                format!("<input type=\"checkbox\" name=\"id\" value=\"{}\">", esc(&id))
            },
            esc(&tenant),
            esc(&third),
            esc(&text_of(e.get("error"))),
            esc(&text_of(e.get("error_class"))),
            esc(&text_of(e.get("retry_count"))),
            esc(&text_of(e.get("failed_at"))),
            v = esc(&id),
        );
    }
    b.push_str(
        "</table><button id=\"replay-selected\" name=\"mode\" value=\"selected\" \
         onclick=\"return confirm('Replay the selected entries?')\">Replay selected</button> \
         <button id=\"replay-all\" name=\"mode\" value=\"all\" \
         onclick=\"return confirm('Replay EVERY entry of this queue?')\">Replay all</button>\
         </form>",
    );
    ok_page("Dead letters", s, &b)
}

/// `POST /ui/dlq/replay`: `one=<id>`, or `mode=selected` with `id=…` fields, or `mode=all`.
async fn dlq_replay(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Bytes,
) -> HttpResponse {
    let fields = form_fields(&body);
    let s = match post_session(&state, &req, &fields) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let queue = dlq_queue(&state, field(&fields, "queue"));
    let ids: Vec<String> = fields
        .iter()
        .filter(|(k, v)| k == "id" && !v.is_empty())
        .map(|(_, v)| v.clone())
        .collect();
    let selection = match (field(&fields, "one"), field(&fields, "mode")) {
        (Some(one), _) if !one.is_empty() => Selection::MessageIds(vec![one.to_string()]),
        (_, Some("all")) => Selection::All,
        (_, Some("selected")) if !ids.is_empty() => Selection::MessageIds(ids),
        _ => {
            let notice = "Nothing selected: tick entries first.".to_string();
            return dlq_page(&state, &s, Some(&queue), None, Some(notice)).await;
        }
    };
    let Some(actor) = crate::http::dlq_actor(&state).await else {
        return unavailable(&s, "the DLQ actor (it needs the RabbitMQ connection)");
    };
    let replayed = tokio::time::timeout(
        Duration::from_secs(60),
        actor.send(ReplayDeadLetters {
            queue: queue.clone(),
            selection,
        }),
    )
    .await;
    let notice = match replayed {
        Ok(Ok(Ok(report))) => {
            let mut n = format!(
                "Replayed {}: <span id=\"replayed\">{}</span>. {} kept.",
                report.replayed.len(),
                esc(&report.replayed.join(", ")),
                report.kept
            );
            if !report.already_published.is_empty() {
                let _ = write!(
                    n,
                    " Already published (removed): {}.",
                    esc(&report.already_published.join(", "))
                );
            }
            for nr in &report.not_replayed {
                let _ = write!(
                    n,
                    "<br>Not replayed: {}: {}",
                    esc(&nr.message_id),
                    esc(&nr.reason)
                );
            }
            n
        }
        Ok(Ok(Err(e))) => format!("The replay failed: {}", esc(&e)),
        _ => "The DLQ actor did not answer; the replay may still be running.".to_string(),
    };
    dlq_page(&state, &s, Some(&queue), None, Some(notice)).await
}

// ---------------------------------------------------------------------------------------
// Configuration.

async fn config(state: web::Data<AppState>, req: HttpRequest) -> HttpResponse {
    let s = match session(&state, &req, false) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let (settings, last) = current(&state).await;
    let settings = &*settings;
    let mut b = String::from("<h1>Configuration</h1>");
    let _ = write!(
        b,
        "<p>Loaded from <code>{}</code>; tenants from <code>{}</code>. Secrets show as \
         <code>***</code>.</p>",
        esc(&settings.path.display().to_string()),
        esc(&settings.tenants_dir.display().to_string())
    );
    b.push_str("<h2>Last reload</h2>");
    match last {
        None => b.push_str(
            "<p id=\"last-reload\" class=\"muted\">No reload has changed the configuration since the service started.</p>",
        ),
        Some((at, outcome)) => {
            let _ = write!(
                b,
                "<div id=\"last-reload\"><p>{} at {} ({}).</p>",
                if outcome.applied {
                    state_badge("ok")
                } else {
                    state_badge("failed")
                },
                esc(&at),
                esc(&outcome.source)
            );
            if let Some(diff) = &outcome.diff {
                let lists = [
                    ("tenants added", &diff.tenants_added),
                    ("tenants removed", &diff.tenants_removed),
                    ("providers added", &diff.providers_added),
                    ("providers removed", &diff.providers_removed),
                    ("providers changed", &diff.providers_changed),
                    ("mailboxes added", &diff.mailboxes_added),
                    ("mailboxes removed", &diff.mailboxes_removed),
                    ("mailboxes changed", &diff.mailboxes_changed),
                    ("restart required for", &diff.restart_required),
                ];
                if diff.is_empty() {
                    b.push_str("<p>Nothing changed.</p>");
                } else {
                    b.push_str("<table id=\"diff\">");
                    for (k, v) in lists.iter().filter(|(_, v)| !v.is_empty()) {
                        let _ = write!(b, "<tr><th>{k}</th><td>{}</td></tr>", esc(&v.join(", ")));
                    }
                    b.push_str("</table>");
                }
            }
            for p in &outcome.problems {
                let _ = write!(b, "<p class=\"err\">{}</p>", esc(p));
            }
            b.push_str("</div>");
        }
    }
    if !settings.warnings.is_empty() {
        b.push_str("<h2>Warnings</h2><ul>");
        for w in &settings.warnings {
            let _ = write!(b, "<li>{}</li>", esc(&w.to_string()));
        }
        b.push_str("</ul>");
    }
    b.push_str(
        "<h2>Tenants</h2><table id=\"tenants\"><tr><th>tenant</th><th>name</th><th>file</th>\
         <th>providers</th><th>mailboxes</th></tr>",
    );
    for t in &settings.tenants {
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&t.id),
            esc(&t.name),
            esc(&t.file.display().to_string()),
            t.providers.len(),
            t.mailboxes.len()
        );
    }
    b.push_str("</table><h2>Providers</h2>");
    for t in &settings.tenants {
        for p in &t.providers {
            let _ = write!(
                b,
                "<details open><summary>{} ({}, tenant {})</summary><pre>{}\n\nlimits: {:?}\n\
                 max_connections: {}</pre></details>",
                esc(&p.id),
                esc(p.config.kind()),
                esc(&t.id),
                esc(&format!("{:#?}", p.config)),
                p.limits,
                p.max_connections
            );
        }
    }
    let mailboxes: usize = settings.tenants.iter().map(|t| t.mailboxes.len()).sum();
    let _ = write!(
        b,
        "<h2>Mailboxes</h2><p>{mailboxes} configured (see <a href=\"/ui/mailboxes\">Mailboxes</a>).</p>"
    );
    if mailboxes <= 200 {
        for t in &settings.tenants {
            for m in &t.mailboxes {
                let _ = write!(
                    b,
                    "<details><summary>{} (tenant {})</summary><pre>{}</pre></details>",
                    esc(&m.id),
                    esc(&t.id),
                    esc(&format!("{m:#?}"))
                );
            }
        }
    }
    b.push_str("<h2>Main file</h2>");
    let sections: [(&str, String); 10] = [
        ("rabbitmq", format!("{:#?}", settings.rabbitmq)),
        ("queues", format!("{:#?}", settings.queues)),
        ("database", format!("{:#?}", settings.database)),
        (
            "http",
            format!("{:#?}\nlisten: {}", settings.http, settings.http_listen),
        ),
        ("retry", format!("{:#?}", settings.retry)),
        ("outbound", format!("{:#?}", settings.outbound)),
        ("inbound", format!("{:#?}", settings.inbound)),
        ("attachments", format!("{:#?}", settings.attachments)),
        (
            "cluster",
            format!(
                "{:#?}\ninstance_id: {}",
                settings.cluster, settings.instance_id
            ),
        ),
        (
            "shutdown",
            format!(
                "grace: {:?}\nlog: {:#?}",
                settings.shutdown_grace, settings.log
            ),
        ),
    ];
    for (name, text) in sections {
        let _ = write!(
            b,
            "<h3>[{name}]</h3><pre id=\"section-{name}\">{}</pre>",
            esc(&text)
        );
    }
    ok_page("Configuration", &s, &b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(
            esc("<script>alert('x')</script> & \"y\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;y&quot;"
        );
    }

    #[test]
    fn session_and_form_tokens_differ_from_the_token_and_each_other() {
        let t = Secret::new("admin-token");
        let session = derive(&t, "session");
        let form = derive(&t, "form");
        assert_eq!(session.len(), 64);
        assert_ne!(session, form);
        assert!(!session.contains("admin-token"));
        assert_eq!(session, derive(&Secret::new("admin-token"), "session"));
        assert_ne!(session, derive(&Secret::new("other"), "session"));
    }

    #[test]
    fn forms_keep_repeated_fields_and_queries_encode() {
        let f = form_fields(b"csrf=a&id=x%26y&id=z+w&mode=selected");
        let ids: Vec<&str> = f
            .iter()
            .filter(|(k, _)| k == "id")
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(ids, ["x&y", "z w"]);
        assert_eq!(field(&f, "mode"), Some("selected"));
        assert_eq!(
            query(&[("tenant", "a b"), ("message_id", "m&1/2"), ("status", "")]),
            "tenant=a+b&message_id=m%261%2F2"
        );
    }
}
