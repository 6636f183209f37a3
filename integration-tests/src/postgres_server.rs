//! Throwaway PostgreSQL clusters: `initdb` once per test process into a template, then a copy per
//! server (about a quarter of a second), started with `pg_ctl` on a free loopback port with trust auth.
//!
//! PostgreSQL refuses to run as root, so when the tests run as root (CI does) every server command runs
//! as the `postgres` user through `runuser`, in a temp dir that user owns.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};

use tempfile::TempDir;

use crate::{Certificates, free_port};

/// One PostgreSQL cluster on a free loopback port, in its own temp dir.
pub struct PostgresServer {
    port: u16,
    dir: TempDir,
    bin: PathBuf,
    running: Mutex<bool>,
}

/// The directory holding `initdb`, `pg_ctl` and `postgres`: the newest under `/usr/lib/postgresql`, or
/// the one `pg_ctl` on `PATH` resolves to.
fn postgres_bin_dir() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|entry| entry.path().join("bin"))
                .filter(|bin| bin.join("pg_ctl").is_file())
                .collect()
        })
        .unwrap_or_default();
    versions.sort_by_key(|bin| {
        bin.parent()
            .and_then(|dir| dir.file_name())
            .and_then(|name| name.to_str())
            .and_then(|name| name.parse::<u32>().ok())
            .unwrap_or(0)
    });
    if let Some(newest) = versions.pop() {
        return newest;
    }
    let pg_ctl = crate::require_binary("pg_ctl", "apt-get install postgresql");
    std::fs::canonicalize(&pg_ctl)
        .ok()
        .and_then(|real| real.parent().map(Path::to_path_buf))
        .expect("the directory of pg_ctl")
}

fn running_as_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Runs a PostgreSQL tool, as the `postgres` user when we are root.
fn run_pg(bin: &Path, tool: &str, args: &[&str]) -> Output {
    let program = bin.join(tool);
    let mut command = if running_as_root() {
        let mut runuser = Command::new("runuser");
        runuser.args(["-u", "postgres", "--"]).arg(&program);
        runuser
    } else {
        Command::new(&program)
    };
    command
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|err| panic!("run {}: {err}", program.display()))
}

fn chown_to_postgres(path: &Path) {
    if running_as_root() {
        let status = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(path)
            .status()
            .expect("run chown");
        assert!(status.success(), "chown {} to postgres", path.display());
    }
}

/// The directory of the template cluster for the PostgreSQL binaries in `bin`: one per machine and
/// PostgreSQL install, in the temp dir (the `postgres` user must read it, so not under `/root`), made
/// once and reused by every test process — a template per process would be left behind at every exit
/// (statics are never dropped).
pub fn template_dir(bin: &Path) -> PathBuf {
    let name: String = bin
        .to_string_lossy()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    std::env::temp_dir().join(format!("state-coordination-pg-template{name}"))
}

/// A fresh cluster made once per machine (see [`template_dir`]), copied for every server.
fn template(bin: &Path) -> &'static Path {
    static TEMPLATE: OnceLock<PathBuf> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let dir = template_dir(bin);
        let data = dir.join("data");
        if data.join("PG_VERSION").is_file() {
            return data;
        }
        // Made beside, then renamed: processes starting at once never see half a cluster.
        let scratch = tempfile::Builder::new()
            .prefix(".pg-template-")
            .tempdir()
            .expect("temp dir for the template cluster");
        chown_to_postgres(scratch.path());
        let scratch_data = scratch.path().join("data");
        let data_arg = scratch_data.to_str().expect("utf-8 temp path");
        let out = run_pg(
            bin,
            "initdb",
            &[
                "-D",
                data_arg,
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
                "--no-instructions",
            ],
        );
        assert!(
            out.status.success(),
            "initdb failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let made = scratch.keep();
        if dir.exists() && !data.join("PG_VERSION").is_file() {
            // Not a template: something else under the name. Replace it.
            let _ = std::fs::remove_dir_all(&dir);
        }
        if std::fs::rename(&made, &dir).is_err() {
            // Another process finished first: use theirs.
            let _ = std::fs::remove_dir_all(&made);
        }
        data
    })
}

impl PostgresServer {
    /// Starts a new cluster and waits until it accepts connections.
    ///
    /// # Panics
    /// When PostgreSQL is missing or does not start (its log is in the message).
    pub fn start_new() -> Self {
        let bin = postgres_bin_dir();
        let template = template(&bin);
        let dir = tempfile::Builder::new()
            .prefix("pg-fixture-")
            .tempdir()
            .expect("temp dir for postgres");
        chown_to_postgres(dir.path());
        let data = dir.path().join("data");
        let copy = if running_as_root() {
            Command::new("runuser")
                .args(["-u", "postgres", "--", "cp", "-a"])
                .arg(template)
                .arg(&data)
                .status()
        } else {
            Command::new("cp")
                .arg("-a")
                .arg(template)
                .arg(&data)
                .status()
        };
        assert!(copy.expect("run cp").success(), "copy the template cluster");
        let server = PostgresServer {
            port: free_port(),
            dir,
            bin,
            running: Mutex::new(false),
        };
        server.start();
        server
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The postmaster's and its backends' process ids while it runs (for their CPU time:
    /// [`crate::cpu::cpu_seconds`]).
    pub fn pids(&self) -> Vec<u32> {
        let pid_file = std::path::Path::new(&self.data()).join("postmaster.pid");
        std::fs::read_to_string(pid_file)
            .ok()
            .and_then(|text| text.lines().next()?.trim().parse::<u32>().ok())
            .map(crate::cpu::with_children)
            .unwrap_or_default()
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    fn data(&self) -> String {
        self.dir.path().join("data").to_string_lossy().into_owned()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// The server's log so far (with `log_statement = 'all'`, every statement it ran).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn running(&self) -> std::sync::MutexGuard<'_, bool> {
        self.running
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// (Re)starts the cluster on its port and waits until it accepts connections; a no-op when it runs.
    ///
    /// # Panics
    /// When it does not start.
    pub fn start(&self) {
        let mut running = self.running();
        if *running {
            return;
        }
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c fsync=off \
             -c full_page_writes=off -c max_connections=300",
            self.port,
            self.dir.path().display()
        );
        let log = self.log_path().to_string_lossy().into_owned();
        let data = self.data();
        let out = run_pg(
            &self.bin,
            "pg_ctl",
            &[
                "-D", &data, "-l", &log, "-o", &options, "-w", "-t", "60", "start",
            ],
        );
        if !out.status.success() {
            panic!(
                "pg_ctl start failed: {}{}\nlog:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(self.log_path()).unwrap_or_default()
            );
        }
        *running = true;
    }

    /// Stops the cluster at once (`pg_ctl stop -m immediate`: like a crash, every connection dies).
    pub fn stop(&self) {
        let mut running = self.running();
        if !*running {
            return;
        }
        let data = self.data();
        let _ = run_pg(
            &self.bin,
            "pg_ctl",
            &["-D", &data, "-m", "immediate", "-w", "-t", "60", "stop"],
        );
        *running = false;
    }

    /// Stops and starts the cluster on the same port.
    pub fn restart(&self) {
        self.stop();
        self.start();
    }

    /// Turns on TLS (a certificate for `127.0.0.1` signed by a throwaway CA, returned) and adds the login
    /// role `user` with `password` stored as SCRAM-SHA-256 (allowed to create in the database and its
    /// `public` schema, as an application's role is). Over TCP, `user` must then use TLS and
    /// SCRAM (a plain-text connection is rejected); `postgres` keeps trust auth for the other fixtures.
    /// Restarts the cluster.
    ///
    /// # Panics
    /// When a step fails (`openssl`, `psql`, the restart).
    pub fn require_tls_and_scram(&self, user: &str, password: &str) -> Certificates {
        let certificates = Certificates::make(&self.dir.path().join("certificates"));
        let data = PathBuf::from(self.data());
        for (from, to) in [
            (certificates.server_cert(), "server.crt"),
            (certificates.server_key(), "server.key"),
        ] {
            std::fs::copy(&from, data.join(to)).expect("copy the server certificate");
        }
        std::fs::write(
            data.join("pg_hba.conf"),
            format!(
                "local all all trust\n\
                 hostssl all {user} 127.0.0.1/32 scram-sha-256\n\
                 hostnossl all {user} 127.0.0.1/32 reject\n\
                 host all postgres 127.0.0.1/32 trust\n"
            ),
        )
        .expect("write pg_hba.conf");
        let mut conf = std::fs::read_to_string(data.join("postgresql.conf")).unwrap_or_default();
        conf.push_str(
            "\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n\
             password_encryption = 'scram-sha-256'\n",
        );
        std::fs::write(data.join("postgresql.conf"), conf).expect("write postgresql.conf");
        chown_to_postgres(&data);
        let key = data.join("server.key");
        let chmod = Command::new("chmod").arg("600").arg(&key).status();
        assert!(
            chmod.is_ok_and(|status| status.success()),
            "chmod the server key"
        );
        self.restart();
        let socket = self.dir.path().to_string_lossy().into_owned();
        let port = self.port.to_string();
        let create = format!(
            "CREATE ROLE \"{user}\" LOGIN PASSWORD '{password}'; \
             GRANT CREATE ON DATABASE postgres TO \"{user}\"; \
             GRANT ALL ON SCHEMA public TO \"{user}\";"
        );
        let out = run_pg(
            &self.bin,
            "psql",
            &[
                "-h", &socket, "-p", &port, "-U", "postgres", "-d", "postgres", "-c", &create,
            ],
        );
        assert!(
            out.status.success(),
            "create the role: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        certificates
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        self.stop();
    }
}
