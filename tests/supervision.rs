//! The supervisor restarts a child whose handler panicked, counts the restart, and keeps the
//! process and its other actors alive. Runs the supervisor in-process against the real
//! RabbitMQ and PostgreSQL.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use common::TestEnv;
use mailbridge::actors::metrics::{GetCounter, GetHealth, MetricsActor};
use mailbridge::actors::supervisor::{AddChild, ChildId, ChildSpec, Drain, Shutdown, Supervisor};
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
        ChildSpec::new(ChildId::Other("crashy".into()), false, move |_ctx| {
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
    let health = metrics.send(GetHealth::default()).await.unwrap();
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

/// The restart delays of a child that keeps crashing: 200 ms doubling (the supervisor looks
/// every 250 ms, so each restart comes up to two ticks after its delay), and back to 200 ms
/// for a child that lived 30 s before it crashed. The supervisor measures lifetimes with the
/// real clock (`std::time::Instant`), so this test does too.
#[actix_rt::test]
async fn restart_delays_double_from_200ms_and_start_over_after_30s_of_life() {
    let env = TestEnv::new("backoff");
    let settings = Arc::new(Settings::load(&env.config_path()).expect("test config loads"));
    let metrics = MetricsActor::default().start();
    let pool = mailbridge::storage::pool(&settings.database).unwrap();
    let supervisor = Supervisor::new(settings.clone(), pool, metrics.clone()).start();

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Addr<Crashy>)>();
    let starts = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let spec = {
        let starts = starts.clone();
        ChildSpec::new(ChildId::Other("crashy".into()), false, move |_ctx| {
            let generation = starts.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            let addr = Crashy { generation }.start();
            let _ = tx.send((Instant::now(), addr.clone()));
            Box::new(addr)
        })
    };
    supervisor.send(AddChild(spec)).await.unwrap();
    let (_, mut child) = tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("the child starts once the database is migrated")
        .unwrap();

    // Crashes the running child now; returns how long until the next instance started.
    async fn crash_and_time(
        child: &Addr<Crashy>,
        rx: &mut tokio::sync::mpsc::UnboundedReceiver<(Instant, Addr<Crashy>)>,
    ) -> (Duration, Addr<Crashy>) {
        let crashed = Instant::now();
        assert!(child.send(Crash(true)).await.is_err(), "the child panicked");
        let (started, next) = tokio::time::timeout(Duration::from_secs(40), rx.recv())
            .await
            .expect("restarted")
            .unwrap();
        (started.duration_since(crashed), next)
    }
    // Up to one tick to notice the crash, up to one more for the tick after the delay, and
    // some room for a busy machine.
    let slack = Duration::from_millis(750);
    let mut gaps = Vec::new();
    for want_ms in [200u64, 400, 800, 1600, 3200] {
        let (gap, next) = crash_and_time(&child, &mut rx).await;
        child = next;
        gaps.push(gap);
        let want = Duration::from_millis(want_ms);
        assert!(
            gap >= want && gap <= want + slack,
            "restart after {gap:?}, expected {want:?} (+ up to {slack:?}); all so far: {gaps:?}"
        );
    }
    println!("restart delays of 5 crashes in a row: {gaps:?}");
    // Growing: compared two doublings apart, where the difference (1.2 s, 2.4 s) is more than
    // the slack (neighbours may swap within it on a busy machine).
    assert!(gaps[3] > gaps[1] && gaps[4] > gaps[2], "{gaps:?}");

    // A child that lived over 30 s starts from the beginning again: 200 ms, then 400 ms —
    // not 6.4 s, which the sixth crash in a row would get.
    tokio::time::sleep(Duration::from_secs(31)).await;
    let mut after = Vec::new();
    for want_ms in [200u64, 400] {
        let (gap, next) = crash_and_time(&child, &mut rx).await;
        child = next;
        after.push(gap);
        let want = Duration::from_millis(want_ms);
        assert!(
            gap >= want && gap <= want + slack,
            "restart after {gap:?}, expected {want:?} after 31 s of life; {after:?}"
        );
    }
    println!("after 31 s of life: {after:?}");
    assert_eq!(child.send(Crash(false)).await.unwrap(), 8);
    let restarts = metrics
        .send(GetCounter {
            name: "mailbridge_actor_restarts_total",
            labels: vec![("actor", "crashy".into())],
        })
        .await
        .unwrap();
    assert_eq!(restarts, 7);
    supervisor
        .send(Shutdown {
            grace: Duration::from_secs(2),
        })
        .await
        .unwrap();
}
