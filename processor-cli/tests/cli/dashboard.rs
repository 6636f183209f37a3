//! The live fleet dashboard in a real browser: headless Chromium (Debian's `chromium`, installed by the
//! test command) opens `processor demo --http`'s page while the demo runs, and the test reads what the
//! page's JavaScript drew — the leader and every partition's owner — before and after the demo kills
//! an instance. A screenshot is saved under the target directory.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;
use integration_tests::free_ports;

/// What the dashboard showed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Shown {
    leader: String,
    owners: BTreeMap<i32, String>,
}

/// Headless Chromium's arguments for `url`, with its profile in `profile`. Virtual time lets the page
/// poll and draw before the DOM is read.
fn chromium(profile: &std::path::Path) -> Command {
    let mut command = Command::new("chromium");
    command
        .args(["--headless", "--no-sandbox", "--disable-gpu"])
        .args(["--window-size=1200,1000", "--virtual-time-budget=1500"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .stdin(Stdio::null())
        .stderr(Stdio::null());
    command
}

/// The page's DOM after its scripts ran.
fn rendered(profile: &std::path::Path, url: &str) -> String {
    let out = chromium(profile)
        .arg("--dump-dom")
        .arg(url)
        .output()
        .expect("run chromium: the test command installs Debian's `chromium`");
    assert!(out.status.success(), "chromium failed: {:?}", out.status);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The text of the first element after `marker`.
fn text_after<'a>(dom: &'a str, marker: &str) -> Option<&'a str> {
    let start = dom.find(marker)? + marker.len();
    let rest = &dom[start..];
    let open = rest.find('>')? + 1;
    let close = rest[open..].find('<')?;
    Some(&rest[open..open + close])
}

fn read_dashboard(dom: &str) -> Shown {
    let leader = text_after(dom, "id=\"leader\"").unwrap_or("?").to_owned();
    let mut owners = BTreeMap::new();
    for partition in 0..PARTITIONS {
        let row = format!("data-partition=\"{partition}\"");
        if let Some(at) = dom.find(&row)
            && let Some(owner) = text_after(&dom[at..], "class=\"owner")
        {
            owners.insert(partition, owner.to_owned());
        }
    }
    Shown { leader, owners }
}

/// Every partition shows exactly one owner (`a, b` is two: a hand-off in flight), and a leader.
fn complete(shown: &Shown) -> bool {
    shown.leader != "none"
        && shown.owners.len() == PARTITIONS as usize
        && shown
            .owners
            .values()
            .all(|owner| owner != "unowned" && !owner.contains(','))
}

fn wait_shown(
    profile: &std::path::Path,
    url: &str,
    what: &str,
    within: Duration,
    done: impl Fn(&Shown) -> bool,
) -> Shown {
    let deadline = Instant::now() + within;
    loop {
        let shown = read_dashboard(&rendered(profile, url));
        if done(&shown) {
            return shown;
        }
        assert!(
            Instant::now() < deadline,
            "the dashboard never showed {what}; last: {shown:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn the_dashboard_shows_the_leader_every_owner_and_the_hand_off_after_a_kill() {
    let scratch = Scratch::new();
    let root = scratch.path();
    let profile = root.join("chromium-profile");
    let port = free_ports(1)[0];
    let url = format!("http://127.0.0.1:{port}/");
    let events = root.join("demo.log");
    // Enough records that the kill (at 30 % checkpointed) comes several seconds in.
    let mut demo = Proc(
        processor(&["demo", "--no-progress", "--records", "200000"])
            .args(["--http", &format!("127.0.0.1:{port}"), "--linger-secs", "5"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&events).unwrap())
            .spawn()
            .unwrap(),
    );
    let killed = || {
        std::fs::read_to_string(&events)
            .unwrap_or_default()
            .contains("killed instance b")
    };

    // Before the kill: a leader, one owner per partition, and instance b among the owners.
    let before = wait_shown(
        &profile,
        &url,
        "a leader and every owner, b among them",
        Duration::from_secs(60),
        |shown| complete(shown) && shown.owners.values().any(|o| o == "b"),
    );
    assert!(
        !killed(),
        "the demo killed b before the page was read: give it more records"
    );

    // After the kill: b's partitions have new owners, and the page says so.
    let deadline = Instant::now() + Duration::from_secs(90);
    while !killed() {
        assert!(Instant::now() < deadline, "the demo never killed b");
        std::thread::sleep(Duration::from_millis(200));
    }
    let after = wait_shown(
        &profile,
        &url,
        "b's partitions owned by others",
        Duration::from_secs(60),
        |shown| complete(shown) && !shown.owners.values().any(|o| o == "b"),
    );
    let moved: Vec<i32> = before
        .owners
        .iter()
        .filter(|(p, owner)| after.owners.get(p) != Some(owner))
        .map(|(p, _)| *p)
        .collect();
    assert!(
        !moved.is_empty(),
        "an owner changed: {before:?} -> {after:?}"
    );

    let screenshot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let status = chromium(&profile)
        .arg(format!("--screenshot={}", screenshot.display()))
        .arg(&url)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let size = std::fs::metadata(&screenshot).map(|m| m.len()).unwrap_or(0);
    assert!(
        size > 10_000,
        "screenshot {} is {size} bytes",
        screenshot.display()
    );
    eprintln!("dashboard screenshot: {}", screenshot.display());

    let exit = demo.wait_exit(Duration::from_secs(180));
    assert!(
        exit.success(),
        "the demo's verdict: see {}",
        events.display()
    );
}
