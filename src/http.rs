//! The HTTP surface (contract §6), served by actix-web.
//!
//! Handlers hold no state of their own: each asks the actor that owns the answer
//! (the metrics actor for `/health` and `/metrics`, the supervisor for queue depths).

use actix::Addr;
use actix_web::{web, HttpResponse};

use crate::actors::metrics::{GetHealth, MetricsActor, RenderMetrics};
use crate::actors::supervisor::{GetQueueStatus, Supervisor};

#[derive(Clone)]
pub struct AppState {
    pub metrics: Addr<MetricsActor>,
    pub supervisor: Addr<Supervisor>,
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/health", web::get().to(health))
        .route("/metrics", web::get().to(metrics))
        .route("/api/rabbitmq/status", web::get().to(queue_status));
}

fn unavailable(what: &str) -> HttpResponse {
    HttpResponse::ServiceUnavailable().json(serde_json::json!({
        "success": false,
        "error": format!("the {what} is not running; the supervisor restarts it"),
    }))
}

async fn health(state: web::Data<AppState>) -> HttpResponse {
    match state.metrics.send(GetHealth).await {
        Ok(report) if report.ready() => HttpResponse::Ok().json(report),
        Ok(report) => HttpResponse::ServiceUnavailable().json(report),
        Err(_) => unavailable("metrics actor"),
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
