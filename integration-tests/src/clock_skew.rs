//! Processes whose wall clock disagrees with the machine's: libfaketime preloaded into a child, its
//! monotonic clock left alone (timeouts and sleeps keep working; only "what time is it" lies).

use std::path::Path;
use std::process::Command;

/// The path of libfaketime's preload library.
///
/// # Panics
/// With an install hint when it is missing: a skew test never passes without real skew.
pub fn libfaketime() -> String {
    let candidates = [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
    ];
    candidates
        .iter()
        .find(|path| Path::new(path).is_file())
        .map(|path| (*path).to_owned())
        .expect("libfaketime not found: apt-get install faketime (scripts/test.sh installs it)")
}

/// Makes `command` run with its wall clock shifted by `offset` (libfaketime syntax: "+1h", "-2h").
pub fn skew_clock<'a>(command: &'a mut Command, offset: &str) -> &'a mut Command {
    command
        .env("LD_PRELOAD", libfaketime())
        .env("FAKETIME", offset)
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .env("FAKETIME_NO_CACHE", "1")
}
