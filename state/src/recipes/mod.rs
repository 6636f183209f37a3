//! Coordination recipes built on [`DistributedLock`](crate::DistributedLock): every one works over an
//! `Arc<dyn DistributedLock>`, so over any backend.
//!
//! | recipe | module |
//! |---|---|
//! | keep a lock alive in the background, know at once when it is lost (watchdog) | [`keeper`] |
//! | leader election with terms, heartbeats and hand-over | [`leader`] |
//! | coordinated checkpoints recorded with fencing | [`checkpoint`] |
//! | per-partition compaction, skipped when claimed elsewhere | [`compaction`] |
//! | distributed task queue and persistent recurring jobs | [`tasks`] |
//! | storage that rejects stale fencing tokens | [`fenced`] |
//! | several resources, all or nothing, deadlock-free | [`multi`] |
//! | at most N holders | [`semaphore`] |
//! | group membership listed in one request (a roster of leased members) | [`roster`] |
//! | optimistic versioned updates (compare-and-set with retry) | [`versioned`] |

pub mod checkpoint;
pub mod compaction;
pub mod fenced;
pub mod keeper;
pub mod leader;
pub mod multi;
pub mod roster;
pub mod semaphore;
pub mod tasks;
pub mod versioned;
