//! The binary's metrics exporter: the library crates record through the `metrics` facade; this installs
//! the Prometheus recorder whose text `/metrics` serves.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use metrics_exporter_prometheus::PrometheusBuilder;
use metrics_util::MetricKindMask;
use processor::http::MetricsRender;

/// Histogram buckets for durations, in seconds: from a loopback round trip to a slow checkpoint.
const SECONDS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

/// A gauge not updated for this long disappears from the scrape (a partition handed to another
/// instance stops reporting here; its last lag must not linger).
const IDLE_GAUGES: Duration = Duration::from_secs(30);

/// Installs the Prometheus recorder for the whole process and returns what renders its text.
///
/// # Errors
/// When a recorder is installed already.
pub fn install_prometheus() -> anyhow::Result<MetricsRender> {
    let handle = PrometheusBuilder::new()
        .set_buckets(SECONDS_BUCKETS)
        .context("histogram buckets")?
        .idle_timeout(MetricKindMask::GAUGE, Some(IDLE_GAUGES))
        .install_recorder()
        .context("install the Prometheus metrics recorder")?;
    let upkeep = handle.clone();
    // The exporter without its own listener needs its upkeep run (it drains histogram buffers).
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    Ok(Arc::new(move || handle.render()))
}
