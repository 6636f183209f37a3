//! The torture suite's short mode (the full table, or a soak: `torture run [--soak 30m]`): every backend
//! under each fault that applies to it, three worker processes × two tasks on two resources for 5 s,
//! checked by the independent checker — no violation anywhere fencing is on; and the negative control
//! (fencing off, a holder stopped past its TTL) must report violations, or the checker proves nothing.
//!
//! Scenarios run one at a time (each starts its own servers and processes; running them side by side
//! on two cores would measure the machine, not the locks).

use integration_tests::torture::scenario::{self, Backend, Row, Scenario, Settings};
use tokio::sync::Mutex;

static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

async fn run(scenario: Scenario) -> Row {
    let _turn = ONE_AT_A_TIME.lock().await;
    integration_tests::init_tracing();
    let settings = Settings::short(env!("CARGO_BIN_EXE_torture"));
    let row = scenario::run(scenario, &settings).await;
    println!("{}", scenario::table(std::slice::from_ref(&row)));
    row
}

/// Runs every fault of `backend` with fencing on: each must see real work and no violation.
async fn backend_survives_every_fault(backend: Backend) {
    for &fault in backend.faults() {
        let row = run(Scenario {
            backend,
            fault,
            fenced: true,
        })
        .await;
        let what = format!("{} / {}", backend.name(), fault.name());
        assert!(
            row.verdict.violations.is_empty(),
            "{what}: {:#?}",
            row.verdict.violations
        );
        assert!(
            row.verdict.accepted > 10,
            "{what}: too little work: {row:?}"
        );
        let injects = !matches!(fault, scenario::Fault::None | scenario::Fault::ClockSkew);
        assert!(!injects || row.faults > 0, "{what}: no fault was injected");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unfenced_control_reports_violations() {
    let row = run(Scenario::control()).await;
    assert!(row.faults > 0, "the holder never stopped: {row:?}");
    assert!(
        !row.verdict.violations.is_empty(),
        "fencing off and a holder stopped past its TTL, yet the checker found nothing: {row:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process() {
    backend_survives_every_fault(Backend::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis() {
    backend_survives_every_fault(Backend::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_3() {
    backend_survives_every_fault(Backend::Redlock3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_5() {
    backend_survives_every_fault(Backend::Redlock5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_lease() {
    backend_survives_every_fault(Backend::PostgresLease).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_advisory() {
    backend_survives_every_fault(Backend::PostgresAdvisory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd() {
    backend_survives_every_fault(Backend::Etcd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_3() {
    backend_survives_every_fault(Backend::Etcd3).await;
}
