//! Whether an instance is ready to serve its share of the fleet: what `/ready` answers.

use std::time::Duration;

use serde::Serialize;

use super::instance::Instance;
use crate::source::partition_count;

/// How long each readiness probe (lock backend, broker) may take before it counts as down.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// An instance's readiness, with why not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Readiness {
    /// The instance's id.
    pub instance_id: String,
    /// Ready: the broker and the lock backend answer, it is a member of the fleet and every partition
    /// it owns is restored and consuming.
    pub ready: bool,
    /// What is not ready, one line each (empty when ready).
    pub reasons: Vec<String>,
}

impl Instance {
    /// Asks the lock backend and the brokers (each within [`PROBE_TIMEOUT`]) and looks at the status.
    pub async fn readiness(&self) -> Readiness {
        let config = self.config();
        let mut reasons = Vec::new();
        let probe = format!("health:{}", config.group);
        let lock = self.services().lock.clone();
        match tokio::time::timeout(PROBE_TIMEOUT, lock.get_lock_info(&probe)).await {
            Ok(Ok(_)) => {}
            Ok(Err(err)) => reasons.push(format!("lock backend: {err}")),
            Err(_) => reasons.push(format!("lock backend: no answer within {PROBE_TIMEOUT:?}")),
        }
        let (kafka, topic) = (config.kafka.clone(), config.topic.clone());
        let brokers = tokio::task::spawn_blocking(move || partition_count(&kafka, &topic));
        match tokio::time::timeout(PROBE_TIMEOUT, brokers).await {
            Ok(Ok(Ok(_))) => {}
            Ok(Ok(Err(err))) => reasons.push(format!("brokers: {err}")),
            Ok(Err(err)) => reasons.push(format!("brokers: the probe failed: {err}")),
            Err(_) => reasons.push(format!("brokers: no answer within {PROBE_TIMEOUT:?}")),
        }
        let status = self.status().borrow().clone();
        if !status.members.contains(&config.instance_id) {
            reasons.push("not a member of the fleet yet".to_owned());
        }
        let restoring: Vec<String> = status
            .partition_status
            .iter()
            .filter(|(_, p)| !p.processing)
            .map(|(partition, _)| partition.to_string())
            .collect();
        if !restoring.is_empty() {
            reasons.push(format!(
                "partitions still restoring: {}",
                restoring.join(", ")
            ));
        }
        Readiness {
            instance_id: config.instance_id.clone(),
            ready: reasons.is_empty(),
            reasons,
        }
    }
}
