//! A server process a fixture owns: spawned, killed (SIGKILL), frozen (SIGSTOP) and thawed (SIGCONT),
//! and killed on drop — thawed first, so a frozen one exits at once. Shared by the etcd and Kafka fixtures.

use std::process::Child;
use std::sync::{Mutex, MutexGuard};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// At most one running child of a fixture.
#[derive(Debug, Default)]
pub struct ServerProcess(Mutex<Option<Child>>);

impl ServerProcess {
    /// The running child, if any, locked.
    pub fn child(&self) -> MutexGuard<'_, Option<Child>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether a child runs (or is frozen).
    pub fn is_running(&self) -> bool {
        self.child().is_some()
    }

    /// Keeps `child` as the running process.
    pub fn set(&self, child: Child) {
        *self.child() = Some(child);
    }

    /// Kills the child (SIGKILL) and waits for it to exit; a no-op when none runs.
    pub fn kill(&self) {
        if let Some(mut child) = self.child().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` to the running child.
    ///
    /// # Panics
    /// When none runs, or the signal cannot be sent.
    pub fn signal(&self, signal: Signal) {
        let child = self.child();
        let child = child.as_ref().expect("the server is running");
        let pid = i32::try_from(child.id()).expect("pid fits in i32");
        kill(Pid::from_raw(pid), signal).expect("signal the server");
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Some(child) = self.child().as_ref() {
            let pid = i32::try_from(child.id()).unwrap_or(0);
            let _ = kill(Pid::from_raw(pid), Signal::SIGCONT);
        }
        self.kill();
    }
}
