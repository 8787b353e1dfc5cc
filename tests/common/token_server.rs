//! A stand-in OAuth2 authorization server (hand-rolled HTTP/1.1 on a thread): the
//! `refresh_token` grant of RFC 6749 §6 at `POST /token`, and RFC 7662 introspection at
//! `POST /introspect` (form `token=…`, answer `{"active": …, "username": …}`) for Dovecot's
//! oauth2 passdb and the test SMTP server.
//!
//! `/token` checks `grant_type`, `client_id`, `client_secret` and `refresh_token`; answers
//! `access_token`, `expires_in`, `token_type` and, when rotating, a new `refresh_token` (the
//! one used then stops working, as strict rotation does); a revoked or unknown refresh token
//! gets 400 `{"error":"invalid_grant"}`, a wrong client 401 `invalid_client`. Tests count
//! the token requests, revoke refresh tokens, expire access tokens and make the endpoint fail
//! with 503. Stopped on drop.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
struct State {
    client_id: String,
    client_secret: String,
    /// Refresh tokens that work, and the user each is for.
    refresh_tokens: HashMap<String, String>,
    /// Refresh tokens revoked (answered `invalid_grant`).
    revoked: HashSet<String>,
    /// Issued access tokens: user and expiry.
    access_tokens: HashMap<String, (String, Instant)>,
    rotate: bool,
    expires_in: u64,
    token_requests: u64,
    introspections: u64,
    failing: bool,
    /// How long `/token` waits before answering (to widen races).
    delay: Duration,
    issued: u64,
    /// Every refresh token presented to `/token`, in order.
    presented: Vec<String>,
}

pub struct TokenServer {
    pub port: u16,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
}

impl TokenServer {
    /// A server for one client, with `refresh_token` valid for `user`.
    pub fn start(client_id: &str, client_secret: &str, refresh_token: &str, user: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the token server");
        let port = listener.local_addr().expect("its address").port();
        let state = Arc::new(Mutex::new(State {
            client_id: client_id.into(),
            client_secret: client_secret.into(),
            refresh_tokens: HashMap::from([(refresh_token.to_string(), user.to_string())]),
            expires_in: 3600,
            ..State::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        listener.set_nonblocking(true).expect("nonblocking");
        std::thread::spawn(move || {
            while !sp.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let st = st.clone();
                        std::thread::spawn(move || serve(stream, &st));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        TokenServer { port, state, stop }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn token_url(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }

    pub fn introspection_url(&self) -> String {
        format!("http://127.0.0.1:{}/introspect", self.port)
    }

    /// Answer a new refresh token on every use (the old one then stops working).
    pub fn set_rotate(&self, rotate: bool) {
        self.state().rotate = rotate;
    }

    pub fn set_expires_in(&self, secs: u64) {
        self.state().expires_in = secs;
    }

    pub fn set_delay(&self, d: Duration) {
        self.state().delay = d;
    }

    /// `/token` answers 503 while set.
    pub fn set_failing(&self, failing: bool) {
        self.state().failing = failing;
    }

    /// Every refresh token works no more (`invalid_grant`).
    pub fn revoke_all(&self) {
        let mut s = self.state();
        let tokens: Vec<String> = s.refresh_tokens.drain().map(|(t, _)| t).collect();
        s.revoked.extend(tokens);
        s.access_tokens.clear();
    }

    /// Adds a refresh token that works (a user authorized the account again).
    pub fn add_refresh_token(&self, token: &str, user: &str) {
        self.state()
            .refresh_tokens
            .insert(token.to_string(), user.to_string());
    }

    /// Every access token issued so far is expired (refused by introspection).
    pub fn expire_access_tokens(&self) {
        self.state().access_tokens.clear();
    }

    pub fn token_requests(&self) -> u64 {
        self.state().token_requests
    }

    pub fn introspections(&self) -> u64 {
        self.state().introspections
    }

    /// The refresh tokens that work now.
    pub fn valid_refresh_tokens(&self) -> Vec<String> {
        self.state().refresh_tokens.keys().cloned().collect()
    }

    /// Every refresh token presented to `/token`, in order.
    pub fn presented(&self) -> Vec<String> {
        self.state().presented.clone()
    }

    /// A check of access tokens for another stand-in (an API that takes them as bearers).
    pub fn active_check(&self) -> impl Fn(&str) -> bool + Send + Sync + 'static {
        let state = self.state.clone();
        move |token: &str| {
            state
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .access_tokens
                .get(token)
                .is_some_and(|(_, exp)| *exp > Instant::now())
        }
    }

    /// Whether `token` is a live access token.
    pub fn is_active(&self, token: &str) -> bool {
        self.state()
            .access_tokens
            .get(token)
            .is_some_and(|(_, exp)| *exp > Instant::now())
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve(stream: TcpStream, state: &Arc<Mutex<State>>) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::new(match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    });
    let mut writer = stream;
    // One request per connection is plenty (answers say `Connection: close`).
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();
    let mut length = 0usize;
    let mut authorization = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).is_err() || h == "\r\n" || h.is_empty() {
            break;
        }
        if let Some((name, value)) = h.split_once(':') {
            let name = name.trim().to_ascii_lowercase();
            if name == "content-length" {
                length = value.trim().parse().unwrap_or(0);
            } else if name == "authorization" {
                authorization = Some(value.trim().to_string());
            }
        }
    }
    let mut body = vec![0u8; length];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    let form: HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    let path = target.split('?').next().unwrap_or("");
    let (status, json) = match (method.as_str(), path) {
        ("POST", "/token") => token(state, &form),
        ("POST", "/introspect") | ("GET", "/introspect") => {
            let mut token = form.get("token").cloned();
            if let Some(q) = target.split_once('?').map(|(_, q)| q) {
                let query: HashMap<String, String> = url::form_urlencoded::parse(q.as_bytes())
                    .into_owned()
                    .collect();
                token = token.or_else(|| query.get("token").cloned());
            }
            if let Some(bearer) = authorization
                .as_deref()
                .and_then(|a| a.strip_prefix("Bearer "))
            {
                token = token.or(Some(bearer.to_string()));
            }
            introspect(state, token.as_deref().unwrap_or(""))
        }
        _ => (404, serde_json::json!({"error": "not_found"})),
    };
    let body = json.to_string();
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        503 => "Service Unavailable",
        _ => "Other",
    };
    let _ = write!(
        writer,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = writer.flush();
}

fn token(state: &Arc<Mutex<State>>, form: &HashMap<String, String>) -> (u16, serde_json::Value) {
    let delay = {
        let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
        s.token_requests += 1;
        s.delay
    };
    if !delay.is_zero() {
        std::thread::sleep(delay);
    }
    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
    if s.failing {
        return (503, serde_json::json!({"error": "temporarily_unavailable"}));
    }
    let get = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
    if get("grant_type") != "refresh_token" {
        return (400, serde_json::json!({"error": "unsupported_grant_type"}));
    }
    if get("client_id") != s.client_id || get("client_secret") != s.client_secret {
        return (401, serde_json::json!({"error": "invalid_client"}));
    }
    let presented = get("refresh_token").to_string();
    s.presented.push(presented.clone());
    let Some(user) = s.refresh_tokens.get(&presented).cloned() else {
        return (
            400,
            serde_json::json!({"error": "invalid_grant", "error_description": "Token has been expired or revoked."}),
        );
    };
    s.issued += 1;
    let access = format!("at-standin-secret-{}-{}", s.issued, std::process::id());
    let expires_in = s.expires_in;
    s.access_tokens.insert(
        access.clone(),
        (
            user.clone(),
            Instant::now() + Duration::from_secs(expires_in),
        ),
    );
    let mut answer = serde_json::json!({
        "access_token": access,
        "expires_in": expires_in,
        "token_type": "Bearer",
    });
    if s.rotate {
        let rotated = format!("rt-standin-secret-{}-{}", s.issued, std::process::id());
        s.refresh_tokens.remove(&presented);
        s.refresh_tokens.insert(rotated.clone(), user);
        answer["refresh_token"] = serde_json::Value::String(rotated);
    }
    (200, answer)
}

fn introspect(state: &Arc<Mutex<State>>, token: &str) -> (u16, serde_json::Value) {
    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
    s.introspections += 1;
    match s.access_tokens.get(token) {
        Some((user, exp)) if *exp > Instant::now() => (
            200,
            serde_json::json!({"active": true, "username": user, "token_type": "Bearer"}),
        ),
        _ => (200, serde_json::json!({"active": false})),
    }
}
