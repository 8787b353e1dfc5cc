//! The supervisor restarts a child whose handler panicked, counts the restart, and keeps the
//! process and its other actors alive. Runs the supervisor in-process against the real
//! RabbitMQ and PostgreSQL.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use common::TestEnv;
use mailbridge::actors::metrics::{GetCounter, GetHealth, MetricsActor};
use mailbridge::actors::supervisor::{AddChild, ChildSpec, Drain, Shutdown, Supervisor};
use mailbridge::settings::Settings;

/// A child that panics on request.
struct Crashy {
    generation: u32,
}

impl Actor for Crashy {
    type Context = Context<Self>;
}

#[derive(Message)]
#[rtype(result = "u32")]
struct Crash(bool);

impl Handler<Crash> for Crashy {
    type Result = u32;
    fn handle(&mut self, msg: Crash, _: &mut Context<Self>) -> u32 {
        if msg.0 {
            panic!("deliberate panic from the supervision test");
        }
        self.generation
    }
}

impl Handler<Drain> for Crashy {
    type Result = ();
    fn handle(&mut self, _: Drain, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

#[actix_rt::test]
async fn a_panicking_child_is_restarted_and_counted() {
    let env = TestEnv::new("supervise");
    let settings = Arc::new(Settings::load(&env.config_path()).expect("test config loads"));
    let metrics = MetricsActor::default().start();
    let pool = mailbridge::storage::pool(&settings.database).unwrap();
    let supervisor = Supervisor::new(settings.clone(), pool, metrics.clone()).start();

    // Each start hands the test the new address, and a generation number.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Addr<Crashy>>();
    let starts = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let spec = {
        let starts = starts.clone();
        ChildSpec::new("crashy", false, move |_ctx| {
            let generation = starts.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            let addr = Crashy { generation }.start();
            let _ = tx.send(addr.clone());
            Box::new(addr)
        })
    };
    supervisor.send(AddChild(spec)).await.unwrap();

    let first = tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("the child starts once the database is migrated")
        .unwrap();
    assert_eq!(first.send(Crash(false)).await.unwrap(), 1);

    // The panic kills that actor (its reply never comes) but not the process.
    assert!(first.send(Crash(true)).await.is_err());
    let started = Instant::now();
    let second = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("the supervisor restarts the child")
        .unwrap();
    println!("restarted {:?} after the panic", started.elapsed());
    assert_eq!(second.send(Crash(false)).await.unwrap(), 2);
    assert!(!first.connected());

    let restarts = metrics
        .send(GetCounter {
            name: "mailbridge_actor_restarts_total",
            labels: vec![("actor", "crashy".into())],
        })
        .await
        .unwrap();
    assert_eq!(restarts, 1);
    let health = metrics.send(GetHealth).await.unwrap();
    let child = &health.components.actors["crashy"];
    assert_eq!(child.details["restarts"], 1);

    // A second panic is restarted too, after a longer backoff.
    assert!(second.send(Crash(true)).await.is_err());
    let third = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("restarted again")
        .unwrap();
    assert_eq!(third.send(Crash(false)).await.unwrap(), 3);

    // Shutdown drains the child: it stops and is not restarted.
    supervisor
        .send(Shutdown {
            grace: Duration::from_secs(2),
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!third.connected());
    assert!(rx.try_recv().is_err(), "no restart after shutdown");
}
