//! The torture suite: OS processes contend for locks on a real backend while faults are injected
//! (processes killed or stopped past their TTL, servers restarted, connections frozen, cut or delayed,
//! wall clocks skewed); every critical section is recorded to an append-only history, and a checker that
//! trusts nothing of the code under test decides whether mutual exclusion and fencing held.
//!
//! - [`history`]: the events each worker appends (on `CLOCK_MONOTONIC`, one kernel, so comparable
//!   across processes).
//! - [`checker`]: the verdict over a history and the fenced store's final counters.
//! - [`worker`]: one contending process (the `torture worker` subcommand).
//! - [`scenario`]: servers, workers and faults for one backend × fault, and the results table.

pub mod checker;
pub mod history;
pub mod scenario;
pub mod worker;
