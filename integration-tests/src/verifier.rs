//! The independent output verifier (`integration-tests/verifier/verify_outputs.py`): Python and
//! confluent-kafka — another client and its own recomputation, not the project's code — reading the
//! input and output topics with `read_committed`. Its Python environment is made once, outside the
//! clone (`~/.cache/state-coordination/venv`, or `VERIFIER_VENV`); `scripts/test.sh` makes it first.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;

/// `integration-tests/verifier/verify_outputs.py`.
const VERIFIER_SCRIPT: &str = include_str!("../verifier/verify_outputs.py");

/// The confluent-kafka release the verifier runs on (from PyPI).
pub const CONFLUENT_KAFKA: &str = "confluent-kafka==2.16.1";

/// What the verifier found.
#[derive(Debug, Clone, Deserialize)]
pub struct VerifierReport {
    /// Whether every key's committed outputs are exactly its running aggregates.
    pub ok: bool,
    /// Keys in the input.
    #[serde(default)]
    pub keys: u64,
    /// Valid input records.
    #[serde(default)]
    pub inputs: u64,
    /// Committed output records.
    #[serde(default)]
    pub outputs: u64,
    /// Outputs that repeat an effect already published.
    #[serde(default)]
    pub duplicates: u64,
    /// Input effects with no output.
    #[serde(default)]
    pub missing: u64,
    /// Outputs that are not the recomputation.
    #[serde(default)]
    pub mismatched: u64,
    /// A few violations, described.
    #[serde(default)]
    pub examples: Vec<String>,
    /// Why it could not verify, if it could not.
    #[serde(default)]
    pub error: Option<String>,
}

fn venv() -> PathBuf {
    std::env::var_os("VERIFIER_VENV").map_or_else(
        || {
            let home =
                std::env::var_os("HOME").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
            home.join(".cache").join("state-coordination").join("venv")
        },
        PathBuf::from,
    )
}

/// The verifier's Python, with confluent-kafka installed (made when missing).
///
/// # Panics
/// When Python or PyPI is not available (the message says what to install).
pub fn verifier_python() -> PathBuf {
    let venv = venv();
    let python = venv.join("bin").join("python");
    let ready = |python: &Path| {
        Command::new(python)
            .args(["-c", "import confluent_kafka"])
            .output()
            .is_ok_and(|out| out.status.success())
    };
    if ready(&python) {
        return python;
    }
    let made = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .expect("python3 not found: apt-get install python3 python3-venv");
    assert!(made.success(), "python3 -m venv {} failed", venv.display());
    let installed = Command::new(&python)
        .args(["-m", "pip", "install", "-q", CONFLUENT_KAFKA])
        .status()
        .expect("run pip");
    assert!(installed.success(), "pip install {CONFLUENT_KAFKA} failed");
    assert!(
        ready(&python),
        "confluent_kafka does not import in {}",
        venv.display()
    );
    python
}

/// Runs the verifier on `input` and `output` of `brokers`.
///
/// # Panics
/// When it cannot run, or prints no report.
pub fn verify_outputs(brokers: &str, input: &str, output: &str) -> VerifierReport {
    // The script travels inside the binary (`python -c`): a path baked in at compile time would name
    // whichever checkout built this crate first when several share a target directory.
    let out = Command::new(verifier_python())
        .arg("-c")
        .arg(VERIFIER_SCRIPT)
        .args([brokers, input, output])
        .output()
        .expect("run the verifier");
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|err| {
        panic!(
            "the verifier printed no report ({err}): {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}
