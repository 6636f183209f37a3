//! CPU time of server processes, from `/proc/<pid>/stat`: what a benchmark reports as a server's CPU
//! share (the servers and the client share the machine's cores).

/// User + system CPU seconds the processes `pids` have used so far (a process that is gone counts 0).
pub fn cpu_seconds(pids: &[u32]) -> f64 {
    let ticks: u64 = pids.iter().filter_map(|pid| ticks_of(*pid)).sum();
    // CLK_TCK is 100 on every Linux this runs on; asked once in case it is not.
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|hz| *hz > 0)
        .unwrap_or(100);
    #[allow(clippy::cast_precision_loss)]
    let seconds = ticks as f64 / per_second as f64;
    seconds
}

/// utime + stime of one process, in clock ticks.
fn ticks_of(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: fields count from after its closing parenthesis.
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of the whole line are the 12th and 13th after the name.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// `pid` and every process whose parent is `pid` (PostgreSQL's backends are children of the
/// postmaster).
pub fn with_children(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.filter_map(Result::ok) {
            let Some(child) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let parent = std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| {
                    let after = stat.get(stat.rfind(')')? + 2..)?.to_owned();
                    after.split_whitespace().nth(1)?.parse::<u32>().ok()
                });
            if parent == Some(pid) {
                pids.push(child);
            }
        }
    }
    pids
}
