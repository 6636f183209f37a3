//! Throwaway Apache Kafka brokers (KRaft, no ZooKeeper), each a separate JVM process on free loopback
//! ports in its own temp dir: one combined broker+controller node, or a cluster of three combined nodes
//! (three controller voters, replication factor 3, `min.insync.replicas=2`).
//!
//! The broker's jars come from Maven Central by coordinates (`integration-tests/kafka/pom.xml`), resolved
//! once into a cache outside the clone (`~/.cache/state-coordination/kafka-4.4.0/libs`, or `KAFKA_LIBS`);
//! `scripts/test.sh` fetches them before the tests, and a test that finds them missing fetches them
//! itself. No Kafka client here (this crate stays free of librdkafka): topics are made by the tests
//! through the processor's admin helpers.
//!
//! Fault injection per node: [`KafkaNode::kill`] (SIGKILL), [`KafkaNode::start`] (again, same ports and
//! data), [`KafkaNode::pause`] (SIGSTOP) and [`KafkaNode::resume`].

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tempfile::TempDir;

use crate::process::ServerProcess;
use crate::{Certificates, free_ports, require_binary};

/// The broker release the tests run (the pom's `kafka.version`).
pub const KAFKA_VERSION: &str = "4.4.0";

/// `integration-tests/kafka/pom.xml`: the broker's artifacts, resolved by Maven.
const KAFKA_POM: &str = include_str!("../kafka/pom.xml");

/// How long a node may take to start on a busy 2-core machine.
const READY_WITHIN: Duration = Duration::from_secs(90);

/// The line the broker logs once it serves requests (logger `kafka.server.KafkaRaftServer`).
const STARTED: &str = "Kafka Server started";

const LOG4J2: &str = "\
status = error
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = ${sys:kafka.logs.dir}/server.log
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.file.ref = FILE
logger.started.name = kafka.server.KafkaRaftServer
logger.started.level = INFO
";

/// The directory holding the broker's jars, fetched with Maven when missing.
///
/// # Panics
/// When Java or Maven is missing, or Maven cannot resolve the pom (its output is in the message).
pub fn kafka_libs() -> PathBuf {
    let libs = std::env::var_os("KAFKA_LIBS").map_or_else(default_libs, PathBuf::from);
    if libs.join(".complete").is_file() {
        return libs;
    }
    require_binary("java", "apt-get install openjdk-17-jre-headless");
    let mvn = require_binary("mvn", "apt-get install maven");
    let parent = libs.parent().expect("the libs dir has a parent");
    std::fs::create_dir_all(parent).expect("create the Kafka cache dir");
    // The pom travels inside the binary: a path baked in at compile time would name whichever checkout
    // built this crate first when several share a target directory.
    let project = tempfile::tempdir_in(parent).expect("create a dir for the Kafka pom");
    let pom = project.path().join("pom.xml");
    std::fs::write(&pom, KAFKA_POM).expect("write the Kafka pom");
    // Fetched beside, then renamed: tests fetching at the same time never see half a directory.
    let scratch = tempfile::Builder::new()
        .prefix(".libs-")
        .tempdir_in(parent)
        .expect("create a scratch dir for the Kafka jars");
    let output = Command::new(mvn)
        .args(["-q", "-B", "-f"])
        .arg(&pom)
        .args(["dependency:copy-dependencies", "-DincludeScope=runtime"])
        .arg(format!("-DoutputDirectory={}", scratch.path().display()))
        .output()
        .expect("run mvn");
    assert!(
        output.status.success(),
        "mvn could not fetch the Kafka broker jars ({}):\n{}{}",
        pom.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    std::fs::write(scratch.path().join(".complete"), KAFKA_VERSION)
        .expect("mark the jars complete");
    let fetched = scratch.keep();
    if !libs.join(".complete").is_file() {
        // A directory without the mark is a fetch that did not finish (or a copy made by hand).
        let _ = std::fs::remove_dir_all(&libs);
    }
    if std::fs::rename(&fetched, &libs).is_err() {
        // Someone else finished first.
        let _ = std::fs::remove_dir_all(&fetched);
    }
    assert!(
        libs.join(".complete").is_file(),
        "Kafka jars missing in {}",
        libs.display()
    );
    libs
}

fn default_libs() -> PathBuf {
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    home.join(".cache")
        .join("state-coordination")
        .join(format!("kafka-{KAFKA_VERSION}"))
        .join("libs")
}

/// One Kafka node (broker and controller in one process).
pub struct KafkaNode {
    node_id: u32,
    port: u16,
    controller_port: u16,
    /// The SASL_SSL listener's port and the directory of its certificates, when the node has one.
    secure: Option<(u16, PathBuf)>,
    /// A second plaintext listener's port and the port it advertises (a proxy's), when it has one.
    proxied: Option<(u16, u16)>,
    dir: PathBuf,
    libs: PathBuf,
    process: ServerProcess,
}

impl KafkaNode {
    /// The broker's `host:port`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The node id (1-based).
    pub fn id(&self) -> u32 {
        self.node_id
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("logs").join("server.log")
    }

    /// The node's log (warnings and errors, plus its start line).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_else(|err| format!("(no log: {err})"))
    }

    /// Starts the node (again: same ports, same data) unless it runs; does not wait for it.
    fn spawn(&self) {
        if self.process.is_running() {
            return;
        }
        // The start line of a previous life must not count as this one's.
        let _ = std::fs::remove_file(self.log_path());
        let stdout = std::fs::File::create(self.dir.join("stdout.log")).expect("create stdout.log");
        let stderr = stdout.try_clone().expect("clone stdout.log");
        let spawned = Command::new("java")
            .args([
                "-Xms256m",
                "-Xmx512m",
                "-XX:+UseG1GC",
                "-XX:TieredStopAtLevel=1",
            ])
            .args(["-Djava.awt.headless=true", "-Xshare:auto"])
            .arg(format!(
                "-Dkafka.logs.dir={}",
                self.dir.join("logs").display()
            ))
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                self.dir.join("log4j2.properties").display()
            ))
            .arg("-cp")
            .arg(format!("{}/*", self.libs.display()))
            .arg("kafka.Kafka")
            .arg(self.dir.join("server.properties"))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("spawn the Kafka broker (java)");
        self.process.set(spawned);
    }

    /// Starts the node again after [`kill`](Self::kill) and waits until it serves.
    ///
    /// # Panics
    /// When it does not start (its log is in the message).
    pub fn start(&self) {
        self.spawn();
        self.wait_started();
    }

    fn wait_started(&self) {
        let started = Instant::now();
        while started.elapsed() < READY_WITHIN {
            if self.log().contains(STARTED) {
                return;
            }
            if let Some(child) = self.process.child().as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "Kafka node {} exited ({status}) while starting; log:\n{}\n{}",
                    self.node_id,
                    self.log(),
                    std::fs::read_to_string(self.dir.join("stdout.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "Kafka node {} not started after {READY_WITHIN:?}; log:\n{}",
            self.node_id,
            self.log()
        );
    }

    /// Kills the node (SIGKILL) and waits for it to exit; its data stays for [`start`](Self::start).
    pub fn kill(&self) {
        self.process.kill();
    }

    /// Freezes the node with SIGSTOP: connections stay open, nothing is answered.
    pub fn pause(&self) {
        self.process.signal(Signal::SIGSTOP);
    }

    /// Thaws a paused node with SIGCONT.
    pub fn resume(&self) {
        self.process.signal(Signal::SIGCONT);
    }
}

/// A Kafka cluster of one or more combined broker+controller nodes, stopped (killed) on drop.
pub struct KafkaCluster {
    nodes: Vec<KafkaNode>,
    secure: Option<SecureListener>,
    _dir: TempDir,
}

/// A SASL_SSL listener: where it is, the CA that signed its certificate, and its one user.
#[derive(Debug, Clone)]
pub struct SecureListener {
    /// `127.0.0.1:PORT`.
    pub address: String,
    /// The CA certificate (PEM) clients verify the broker with (`ssl.ca.location`).
    pub ca_location: PathBuf,
}

impl SecureListener {
    /// The SASL PLAIN user.
    pub const USERNAME: &'static str = "alice";
    /// Its password.
    pub const PASSWORD: &'static str = "alice-Secret-7f3e";
}

impl KafkaCluster {
    /// One combined node: replication factor 1 everywhere (internal topics included).
    ///
    /// # Panics
    /// When Java or the jars are missing, or the node does not start.
    pub fn single() -> Self {
        Self::start(1, false, None)
    }

    /// One combined node with a second plaintext listener, `PROXIED`, on `listen_port`, which
    /// advertises `127.0.0.1:{advertised_port}` — the port of a [`FaultProxy`](crate::FaultProxy) to
    /// `listen_port`. Clients that bootstrap through the proxy make every connection through it (the
    /// brokers' metadata names the proxy); [`bootstrap_servers`](Self::bootstrap_servers) stays direct.
    ///
    /// # Panics
    /// As [`single`](Self::single).
    pub fn single_with_proxied_listener(listen_port: u16, advertised_port: u16) -> Self {
        Self::start(1, false, Some((listen_port, advertised_port)))
    }

    /// One combined node that also listens with SASL_SSL: TLS with a throwaway CA (certificate for
    /// `127.0.0.1`) and SASL PLAIN with the one user of [`SecureListener`]. The plaintext listener stays
    /// (for the test's own producers).
    ///
    /// # Panics
    /// As [`single`](Self::single); when `openssl` is missing.
    pub fn single_with_sasl_ssl() -> Self {
        Self::start(1, true, None)
    }

    /// Three combined nodes (three controller voters): replication factor 3 and
    /// `min.insync.replicas=2` by default, internal topics included.
    ///
    /// # Panics
    /// As [`single`](Self::single).
    pub fn three() -> Self {
        Self::start(3, false, None)
    }

    fn start(n: u32, with_sasl_ssl: bool, proxied: Option<(u16, u16)>) -> Self {
        let libs = kafka_libs();
        let dir = tempfile::Builder::new()
            .prefix("kafka-fixture-")
            .tempdir()
            .expect("create a temp dir for Kafka");
        let ports: Vec<(u16, u16)> = free_ports(2 * n as usize)
            .chunks(2)
            .map(|pair| (pair[0], pair[1]))
            .collect();
        let voters = ports
            .iter()
            .enumerate()
            .map(|(i, (_, controller))| format!("{}@127.0.0.1:{controller}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let cluster_id = random_cluster_id(&libs);
        let secure = with_sasl_ssl.then(|| {
            let certs = dir.path().join("certs");
            make_certificates(&certs);
            (free_ports(1)[0], certs)
        });
        let nodes: Vec<KafkaNode> = ports
            .iter()
            .enumerate()
            .map(|(i, (port, controller_port))| {
                let node = KafkaNode {
                    node_id: u32::try_from(i + 1).expect("few nodes"),
                    port: *port,
                    controller_port: *controller_port,
                    secure: secure.as_ref().map(|(port, certs)| (*port, certs.clone())),
                    proxied,
                    dir: dir.path().join(format!("node-{}", i + 1)),
                    libs: libs.clone(),
                    process: ServerProcess::default(),
                };
                node.configure(n, &voters, &cluster_id);
                node
            })
            .collect();
        // All voters must run before any can finish starting: spawn all, then wait.
        for node in &nodes {
            node.spawn();
        }
        for node in &nodes {
            node.wait_started();
        }
        let secure = secure.map(|(port, certs)| SecureListener {
            address: format!("127.0.0.1:{port}"),
            ca_location: certs.join("ca.pem"),
        });
        KafkaCluster {
            nodes,
            secure,
            _dir: dir,
        }
    }

    /// The SASL_SSL listener, when started with [`single_with_sasl_ssl`](Self::single_with_sasl_ssl).
    pub fn secure_listener(&self) -> Option<&SecureListener> {
        self.secure.as_ref()
    }

    /// The bootstrap servers (every node).
    pub fn bootstrap_servers(&self) -> String {
        self.nodes
            .iter()
            .map(KafkaNode::address)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Node `i` (0-based).
    pub fn node(&self, i: usize) -> &KafkaNode {
        &self.nodes[i]
    }

    /// The node whose id (as the brokers report it, e.g. a partition leader) is `id`.
    pub fn node_by_id(&self, id: u32) -> Option<&KafkaNode> {
        self.nodes.iter().find(|node| node.node_id == id)
    }

    /// How many nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether there are no nodes (never, once started).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

impl KafkaNode {
    /// Writes the node's configuration and formats its storage for a cluster of `n` nodes.
    fn configure(&self, n: u32, voters: &str, cluster_id: &str) {
        let data = self.dir.join("data");
        std::fs::create_dir_all(self.dir.join("logs")).expect("create the node's dirs");
        let replication = n.min(3);
        let min_isr = if n >= 3 { 2 } else { 1 };
        let mut properties = String::new();
        let _ = write!(
            properties,
            "process.roles=broker,controller\n\
             node.id={id}\n\
             controller.quorum.voters={voters}\n\
             listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}{secure_listener}{proxied_listener}\n\
             advertised.listeners=PLAINTEXT://127.0.0.1:{port}{secure_listener}{proxied_advertised}\n\
             controller.listener.names=CONTROLLER\n\
             inter.broker.listener.name=PLAINTEXT\n\
             listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL,PROXIED:PLAINTEXT\n\
             log.dirs={data}\n\
             num.partitions=1\n\
             default.replication.factor={replication}\n\
             min.insync.replicas={min_isr}\n\
             offsets.topic.replication.factor={replication}\n\
             offsets.topic.num.partitions=4\n\
             transaction.state.log.replication.factor={replication}\n\
             transaction.state.log.min.isr={min_isr}\n\
             transaction.state.log.num.partitions=4\n\
             share.coordinator.state.topic.replication.factor={replication}\n\
             share.coordinator.state.topic.min.isr={min_isr}\n\
             group.initial.rebalance.delay.ms=0\n\
             auto.create.topics.enable=false\n\
             log.flush.interval.messages=9223372036854775807\n\
             num.network.threads=2\n\
             num.io.threads=2\n\
             background.threads=2\n\
             log.cleaner.enable=false\n",
            id = self.node_id,
            port = self.port,
            controller = self.controller_port,
            data = data.display(),
            secure_listener = self
                .secure
                .as_ref()
                .map(|(port, _)| format!(",SASL_SSL://127.0.0.1:{port}"))
                .unwrap_or_default(),
            proxied_listener = self
                .proxied
                .map(|(listen, _)| format!(",PROXIED://127.0.0.1:{listen}"))
                .unwrap_or_default(),
            proxied_advertised = self
                .proxied
                .map(|(_, advertised)| format!(",PROXIED://127.0.0.1:{advertised}"))
                .unwrap_or_default(),
        );
        if let Some((_, certs)) = &self.secure {
            let _ = write!(
                properties,
                "sasl.enabled.mechanisms=PLAIN\n\
                 listener.name.sasl_ssl.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required username=\"{user}\" password=\"{password}\" user_{user}=\"{password}\";\n\
                 listener.name.sasl_ssl.ssl.keystore.type=PEM\n\
                 listener.name.sasl_ssl.ssl.keystore.location={keystore}\n",
                user = SecureListener::USERNAME,
                password = SecureListener::PASSWORD,
                keystore = certs.join("keystore.pem").display(),
            );
        }
        std::fs::write(self.dir.join("server.properties"), properties)
            .expect("write server.properties");
        std::fs::write(self.dir.join("log4j2.properties"), LOG4J2)
            .expect("write log4j2.properties");
        let output = Command::new("java")
            .arg("-cp")
            .arg(format!("{}/*", self.libs.display()))
            .args(["kafka.tools.StorageTool", "format", "-t", cluster_id, "-c"])
            .arg(self.dir.join("server.properties"))
            .output()
            .expect("run Kafka's StorageTool");
        assert!(
            output.status.success(),
            "formatting Kafka node {} failed:\n{}{}",
            self.node_id,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// A new cluster id from Kafka's own tool (a base64 UUID of its format).
fn random_cluster_id(libs: &Path) -> String {
    let output = Command::new("java")
        .arg("-cp")
        .arg(format!("{}/*", libs.display()))
        .args(["kafka.tools.StorageTool", "random-uuid"])
        .output()
        .expect("run Kafka's StorageTool");
    let id = String::from_utf8_lossy(&output.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_owned();
    assert!(
        output.status.success() && !id.is_empty(),
        "no cluster id from StorageTool"
    );
    id
}

/// A throwaway CA and a certificate for `127.0.0.1` signed by it, in `dir`: `ca.pem` for clients,
/// `keystore.pem` (PKCS#8 key + certificate) for the broker.
fn make_certificates(dir: &Path) {
    Certificates::make(dir);
    let key = std::fs::read_to_string(dir.join("server.key")).expect("read server.key");
    let cert = std::fs::read_to_string(dir.join("server.pem")).expect("read server.pem");
    std::fs::write(dir.join("keystore.pem"), format!("{key}{cert}")).expect("write keystore.pem");
}
