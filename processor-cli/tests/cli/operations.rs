//! The operations endpoint of `processor run --http`, scraped from outside as an operator's tools would:
//! Prometheus series with plausible values after a small run, readiness following the lock backend
//! (a real redis-server, frozen with SIGSTOP), and the status of a three-instance fleet.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::support::*;
use integration_tests::{RedisServer, free_ports};
use processor::dev::Workload;

/// Polls `probe` every 200 ms until it returns `Some`, or panics with `what` and the last value seen.
fn eventually<T>(what: &str, within: Duration, mut probe: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + within;
    loop {
        match probe() {
            Ok(value) => return value,
            Err(last) if Instant::now() > deadline => {
                panic!("timed out after {within:?} waiting for {what}; last seen: {last}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// The samples of `name` in Prometheus text: labels (as written) → value.
fn samples(text: &str, name: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, labels) = match series.split_once('{') {
                Some((metric, labels)) => (metric, labels.trim_end_matches('}')),
                None => (series, ""),
            };
            let value: f64 = value.parse().ok()?;
            (metric == name).then(|| (labels.to_owned(), value))
        })
        .collect()
}

fn get(addr: &str, path: &str) -> Result<(u16, String), String> {
    http_get(addr, path).map_err(|err| format!("GET {path}: {err}"))
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or(serde_json::Value::Null)
}

#[test]
fn metrics_count_every_record_and_show_lag_and_checkpoint_age() {
    let scratch = Scratch::new();
    let root = scratch.path();
    let redis = RedisServer::start_new();
    let (broker, brokers) = Broker::start();
    let workload = Workload {
        records: 6_000,
        keys: 300,
        seed: 7,
        partitions: PARTITIONS,
    };
    produce(&brokers, &workload, 0..workload.records);
    let port = free_ports(1)[0];
    let addr = format!("127.0.0.1:{port}");
    let _p1 = run_instance_with_http("p1", &brokers, &redis.url(), &root, port, &[]);

    // Every produced record is counted once, per partition, and the lag of every partition is 0.
    let text = eventually(
        "all records counted and lag 0",
        Duration::from_secs(60),
        || {
            let (code, text) = get(&addr, "/metrics")?;
            let processed: f64 = samples(&text, "processor_records_processed_total")
                .values()
                .sum();
            let lags = samples(&text, "processor_consumer_lag_records");
            let ages = samples(&text, "processor_checkpoint_age_seconds");
            let caught_up =
                lags.len() == PARTITIONS as usize && lags.values().all(|lag| *lag == 0.0);
            if code == 200
                && processed == workload.records as f64
                && caught_up
                && ages.len() == PARTITIONS as usize
            {
                Ok(text)
            } else {
                Err(format!(
                    "code {code}, processed {processed}, lags {lags:?}, ages {ages:?}"
                ))
            }
        },
    );
    // Checkpoints every 0.5 s (the harness's interval): each partition's last one is at most a few
    // intervals old at the scrape (one may be skipped while retention holds the compaction lock).
    for (labels, age) in samples(&text, "processor_checkpoint_age_seconds") {
        assert!(age < 1.5, "checkpoint age {age} s for {labels}");
    }
    assert_eq!(
        samples(&text, "processor_owned_partitions")
            .values()
            .sum::<f64>(),
        f64::from(PARTITIONS)
    );
    assert_eq!(
        samples(&text, "processor_leader").values().sum::<f64>(),
        1.0,
        "the only instance leads"
    );
    let checkpoints: f64 = samples(&text, "processor_checkpoints_total").values().sum();
    assert!(
        checkpoints >= f64::from(PARTITIONS),
        "{checkpoints} checkpoints"
    );
    let uploaded: f64 = samples(&text, "processor_checkpoint_uploaded_bytes_total")
        .values()
        .sum();
    assert!(uploaded > 0.0, "checkpoint bytes uploaded");
    let state: f64 = samples(&text, "processor_state_size_bytes").values().sum();
    assert!(state > 0.0, "state size");
    // The lock backend's series: the claims are extended on Redis, none lost.
    let extends = samples(&text, "state_lock_extends_total");
    assert!(
        extends
            .iter()
            .any(|(labels, n)| labels.contains("backend=\"redis\"")
                && labels.contains("outcome=\"ok\"")
                && *n > 0.0),
        "{extends:?}"
    );
    assert!(
        samples(&text, "state_locks_lost_total")
            .values()
            .all(|n| *n == 0.0)
    );
    let attempts = samples(&text, "state_lock_acquire_attempts_total");
    assert!(
        attempts
            .keys()
            .any(|labels| labels.contains("outcome=\"acquired\"")),
        "{attempts:?}"
    );
    assert!(
        text.contains("state_lock_operation_duration_seconds_bucket{"),
        "latency histograms have buckets"
    );
    let tasks = samples(&text, "state_tasks_total");
    assert!(
        tasks
            .keys()
            .any(|labels| labels.contains("event=\"completed\"")),
        "maintenance jobs complete: {tasks:?}"
    );
    // Liveness, and the status of the one instance.
    assert_eq!(get(&addr, "/health").unwrap().0, 200);
    let status = json(&get(&addr, "/status").unwrap().1);
    assert_eq!(status["instance_id"], "p1");
    assert_eq!(
        status["owned"].as_object().unwrap().len(),
        PARTITIONS as usize
    );
    broker.stop();
}

#[test]
fn ready_turns_503_while_the_lock_backend_is_frozen_and_200_when_it_returns() {
    let scratch = Scratch::new();
    let root = scratch.path();
    let redis = RedisServer::start_new();
    let (broker, brokers) = Broker::start();
    let port = free_ports(1)[0];
    let addr = format!("127.0.0.1:{port}");
    let _p1 = run_instance_with_http("p1", &brokers, &redis.url(), &root, port, &[]);
    eventually("ready", Duration::from_secs(60), || {
        match get(&addr, "/ready")? {
            (200, _) => Ok(()),
            (code, body) => Err(format!("{code} {body}")),
        }
    });

    redis.pause();
    let body = eventually(
        "503 while redis is frozen",
        Duration::from_secs(20),
        || match get(&addr, "/ready")? {
            (503, body) => Ok(body),
            (code, body) => Err(format!("{code} {body}")),
        },
    );
    let reasons = json(&body)["reasons"].to_string();
    assert!(reasons.contains("lock backend"), "{body}");

    redis.resume();
    eventually(
        "200 after redis resumed",
        Duration::from_secs(30),
        || match get(&addr, "/ready")? {
            (200, _) => Ok(()),
            (code, body) => Err(format!("{code} {body}")),
        },
    );
    broker.stop();
}

#[test]
fn status_of_a_three_instance_fleet_names_one_leader_and_an_owner_for_every_partition() {
    let scratch = Scratch::new();
    let root = scratch.path();
    let redis = RedisServer::start_new();
    let (broker, brokers) = Broker::start();
    let ports = free_ports(3);
    let ids = ["p1", "p2", "p3"];
    let _fleet: Vec<Proc> = ids
        .iter()
        .zip(&ports)
        .map(|(id, port)| {
            run_instance_with_http(
                id,
                &brokers,
                &redis.url(),
                &root,
                *port,
                &["--log-format", "json"],
            )
        })
        .collect();
    let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();

    eventually(
        "one leader and one owner per partition",
        Duration::from_secs(60),
        || {
            let mut leaders = Vec::new();
            let mut owners: BTreeMap<i64, Vec<String>> = BTreeMap::new();
            for addr in &addrs {
                let status = json(&get(addr, "/status")?.1);
                let id = status["instance_id"].as_str().unwrap_or("?").to_owned();
                if status["leader"] == true {
                    leaders.push(id.clone());
                }
                if status["members"].as_array().map_or(0, Vec::len) != 3 {
                    return Err(format!("{id} sees members {}", status["members"]));
                }
                for partition in status["owned"].as_object().into_iter().flatten() {
                    owners
                        .entry(partition.0.parse().unwrap())
                        .or_default()
                        .push(id.clone());
                }
            }
            let complete =
                (0..i64::from(PARTITIONS)).all(|p| owners.get(&p).is_some_and(|o| o.len() == 1));
            if leaders.len() == 1 && complete {
                Ok(())
            } else {
                Err(format!("leaders {leaders:?}, owners {owners:?}"))
            }
        },
    );
    // Any member lists every member with where it serves its status, and each answers there.
    let (code, body) = get(&addrs[0], "/members").unwrap();
    assert_eq!(code, 200);
    let listed: BTreeSet<(String, String)> = json(&body)
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["id"].as_str().unwrap().to_owned(),
                m["status_url"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected: BTreeSet<(String, String)> = ids
        .iter()
        .zip(&addrs)
        .map(|(id, addr)| {
            (
                (*id).to_owned(),
                format!("http://{addr}/instances/{id}/status"),
            )
        })
        .collect();
    assert_eq!(listed, expected);
    for (id, addr) in ids.iter().zip(&addrs) {
        let (code, body) = get(addr, &format!("/instances/{id}/status")).unwrap();
        assert_eq!(code, 200);
        assert_eq!(json(&body)["instance_id"], *id);
    }
    // `--log-format json`: one object per line; a partition's lines carry its span (instance,
    // partition, fencing token). A partition is owned (in the status) before it has started (its store
    // opened, its consumer positioned): wait for p1 to have logged a start.
    eventually("p1 logs a partition start", Duration::from_secs(30), || {
        let log = std::fs::read_to_string(root.join("p1.log")).map_err(|e| e.to_string())?;
        if log.contains("partition started") {
            Ok(())
        } else {
            Err("no \"partition started\" line yet".to_owned())
        }
    });
    let log = std::fs::read_to_string(root.join("p1.log")).unwrap();
    let started: Vec<serde_json::Value> = log
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).expect(line))
        .filter(|line| line["fields"]["message"] == "partition started")
        .collect();
    assert!(!started.is_empty(), "{log}");
    for line in started {
        let span = &line["span"];
        assert_eq!(span["name"], "partition", "{line}");
        assert_eq!(span["instance"], "p1", "{line}");
        assert!(
            span["partition"].is_number() && span["fencing_token"].is_number(),
            "{line}"
        );
    }
    broker.stop();
}

/// `GET path` with extra header lines; the status code, the response head (lower-cased) and the body.
fn request(addr: &str, path: &str, headers: &[&str]) -> (u16, String, String) {
    http_request(addr, path, headers).unwrap()
}

/// Live state is never readable cross-origin; with `--http-token` every path but the probes needs the
/// token (the dashboard's page asks for it as a password), no answer is readable cross-origin, and with
/// `--http-allowed-host` a request naming another host (DNS rebinding) is refused.
#[test]
fn live_state_is_not_readable_cross_origin_and_a_token_guards_the_endpoint() {
    const TOKEN: &str = "0123456789abcdef-test";
    const FOREIGN: &str = "Origin: https://evil.example";
    let scratch = Scratch::new();
    let root = scratch.path();
    let (open_locks, guarded_locks) = (RedisServer::start_new(), RedisServer::start_new());
    let (broker, brokers) = Broker::start();
    let workload = Workload {
        records: 200,
        keys: 20,
        seed: 11,
        partitions: PARTITIONS,
    };
    produce(&brokers, &workload, 0..workload.records);
    let ports = free_ports(2);
    let (open, guarded) = (
        format!("127.0.0.1:{}", ports[0]),
        format!("127.0.0.1:{}", ports[1]),
    );
    let _open = run_instance_with_http("open", &brokers, &open_locks.url(), &root, ports[0], &[]);
    let token_flag = ["--http-token", TOKEN, "--http-allowed-host", "127.0.0.1"];
    let _guarded = run_instance_with_http(
        "guarded",
        &brokers,
        &guarded_locks.url(),
        &root,
        ports[1],
        &token_flag,
    );
    let (partition, key, _) = workload.record(0);
    let state_path = format!("/state/{key}?partition={partition}");

    // Without a token: status answers are readable by any origin, live state by none.
    eventually(
        "the open member answers live state",
        Duration::from_secs(60),
        || match http_request(&open, &state_path, &[FOREIGN]).map_err(|e| e.to_string())? {
            (200, head, _) if !head.contains("access-control-allow-origin") => Ok(()),
            (code, head, body) => Err(format!("{code} {head} {body}")),
        },
    );
    let (code, head, _) = request(&open, "/status", &[FOREIGN]);
    assert_eq!(code, 200);
    assert!(head.contains("access-control-allow-origin: *"), "{head}");

    // With a token: 401 everywhere but the probes, naming the scheme to use.
    let bearer = format!("Authorization: Bearer {TOKEN}");
    eventually(
        "the guarded member is up",
        Duration::from_secs(60),
        || match http_request(&guarded, "/status", &[&bearer]).map_err(|e| e.to_string())? {
            (200, _, _) => Ok(()),
            (code, _, body) => Err(format!("{code} {body}")),
        },
    );
    let guarded_paths = [
        "/",
        "/metrics",
        "/status",
        "/members",
        "/instances/guarded/status",
        state_path.as_str(),
        "/instances/guarded/state/k",
    ];
    for path in guarded_paths {
        let (code, head, _) = request(&guarded, path, &[FOREIGN]);
        assert_eq!(code, 401, "{path} without the token");
        assert!(head.contains("www-authenticate"), "{path}: {head}");
        let wrong = request(
            &guarded,
            path,
            &["Authorization: Bearer 0123456789abcdef-nope"],
        );
        assert_eq!(wrong.0, 401, "{path} with a wrong token");
    }
    assert_eq!(request(&guarded, "/health", &[]).0, 200);
    assert_ne!(
        request(&guarded, "/ready", &[]).0,
        401,
        "probes carry no token"
    );
    let (code, head, _) = request(&guarded, "/status", &[&bearer, FOREIGN]);
    assert_eq!(code, 200);
    assert!(!head.contains("access-control-allow-origin"), "{head}");
    eventually(
        "live state with the token",
        Duration::from_secs(60),
        || match http_request(&guarded, &state_path, &[&bearer]).map_err(|e| e.to_string())? {
            (200, _, body) if body.contains("\"found\":true") => Ok(()),
            (code, _, body) => Err(format!("{code} {body}")),
        },
    );
    // A page whose name was re-pointed at this address still names its own host.
    let rebound = request(&guarded, "/health", &["Host: evil.example:9090"]);
    assert_eq!(rebound.0, 403, "a foreign Host");
    broker.stop();
}
