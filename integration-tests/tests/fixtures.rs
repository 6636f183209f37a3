//! The fixtures clean up after themselves across processes: a test process that started PostgreSQL
//! leaves no template cluster behind (each used to leave a 39 MB `pg-template-*` in the temp dir).

use std::process::Command;

fn leftover_templates() -> usize {
    std::fs::read_dir(std::env::temp_dir())
        .expect("read the temp dir")
        .filter_map(Result::ok)
        .filter(|entry| {
            entry
                .file_name()
                .to_string_lossy()
                .starts_with("pg-template-")
        })
        .count()
}

#[test]
#[ignore = "a step run by test_processes_leave_no_postgres_template_behind"]
fn step_start_postgres() {
    let server = integration_tests::PostgresServer::start_new();
    assert!(!server.url().is_empty());
}

#[test]
fn test_processes_leave_no_postgres_template_behind() {
    let before = leftover_templates();
    for _ in 0..2 {
        let out = Command::new(std::env::current_exe().expect("this test binary"))
            .args(["--ignored", "--exact", "step_start_postgres", "--nocapture"])
            .output()
            .expect("run the step");
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("1 passed"),
            "the step failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(
        leftover_templates(),
        before,
        "a process left its template cluster behind"
    );
}
