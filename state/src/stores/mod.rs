//! The storage contracts beside the lock's ([`DistributedLock`](crate::DistributedLock)): what the
//! recipes need from a backend besides locking, backend-free. Each backend implements them in its own
//! folder (`backends/{memory,redis,postgres,etcd}/`); the recipes use only these traits.
//!
//! | contract | used by |
//! |---|---|
//! | [`tasks::TaskStore`] | [`recipes::tasks`](crate::recipes::tasks) |
//! | [`fenced::FencedStore`] | [`recipes::fenced`](crate::recipes::fenced), the processor's checkpoint records |
//! | [`versioned::VersionedStore`] | [`recipes::versioned`](crate::recipes::versioned) |
//! | [`roster::RosterStore`] | [`recipes::roster`](crate::recipes::roster), the processor's fleet membership |

pub mod fenced;
pub mod roster;
pub mod tasks;
pub mod versioned;
