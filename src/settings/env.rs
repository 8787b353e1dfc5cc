//! The seed's environment variables, which override the main file after it is parsed.

use std::collections::BTreeMap;

use super::{ConfigProblem, LogFormat, MainFile, Secret, ENVIRONMENT};

/// A source of environment variables; tests pass a map instead of the process environment.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Env for BTreeMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

/// Applies the environment's overrides to the main file's sections.
pub(super) fn apply_env(env: &dyn Env, main: &mut MainFile, problems: &mut Vec<ConfigProblem>) {
    let MainFile {
        rabbitmq,
        queues,
        database,
        http,
        cluster,
        log,
        ..
    } = main;
    let nonempty = |name: &str| env.var(name).filter(|v| !v.is_empty());
    if let Some(v) = nonempty("RABBITMQ_URL") {
        rabbitmq.url = Some(Secret::new(v));
    }
    if let Some(v) = nonempty("RABBITMQ_HOSTS") {
        rabbitmq.hosts = v
            .split(',')
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .collect();
    }
    if let Some(v) = nonempty("RABBITMQ_HOST") {
        rabbitmq.host = v;
    }
    if let Some(v) = nonempty("RABBITMQ_PORT") {
        match v.parse() {
            Ok(p) => rabbitmq.port = p,
            Err(_) => problems.push(ConfigProblem {
                file: ENVIRONMENT.into(),
                key: "RABBITMQ_PORT".into(),
                message: format!("`{v}` is not a port number"),
            }),
        }
    }
    if let Some(v) = nonempty("RABBITMQ_USERNAME") {
        rabbitmq.username = v;
    }
    if let Some(v) = env.var("RABBITMQ_PASSWORD") {
        rabbitmq.password = Secret::new(v);
    }
    if let Some(v) = nonempty("RABBITMQ_VHOST") {
        rabbitmq.vhost = v;
    }
    for (name, slot) in [
        ("RABBITMQ_EMAIL_SEND_QUEUE", &mut queues.send),
        ("RABBITMQ_EMAIL_INBOUND_QUEUE", &mut queues.inbound),
        ("RABBITMQ_EMAIL_SYNC_USER_QUEUE", &mut queues.sync_user),
        ("RABBITMQ_EMAIL_RESULT_QUEUE", &mut queues.result),
    ] {
        if let Some(v) = nonempty(name) {
            *slot = v;
        }
    }
    if let Some(v) = nonempty("DATABASE_URL") {
        database.url = Secret::new(v);
    }
    if let Some(v) = nonempty("HTTP_LISTEN") {
        http.listen = v;
    }
    if let Some(v) = nonempty("MAILBRIDGE_INSTANCE_ID") {
        cluster.instance_id = Some(v);
    }
    if let Some(v) = nonempty("MAILBRIDGE_LOG_FORMAT") {
        match v.as_str() {
            "json" => log.format = LogFormat::Json,
            "text" => log.format = LogFormat::Text,
            other => problems.push(ConfigProblem {
                file: ENVIRONMENT.into(),
                key: "MAILBRIDGE_LOG_FORMAT".into(),
                message: format!("`{other}` is not a log format; use json or text"),
            }),
        }
    }
}
