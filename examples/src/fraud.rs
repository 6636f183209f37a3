//! Per-account fraud counters: a complete user job on the processor fleet, written only against the
//! `processor` crate's public API ([`processor::job`]).
//!
//! Input: payments keyed by account id, the value `{"amount": 1250, "merchant": "m-17"}` (amount in
//! cents), the record's timestamp as the payment time. Per account and tumbling window of payment
//! time, the job counts payments and sums amounts, and publishes an [`Alert`] the first time an
//! account crosses either limit within a window. Bad payments (no timestamp, an amount not above
//! zero, a value that is not such JSON) are dead-lettered with the reason.
//!
//! [`PaymentsDemo`] is the same job with a deterministic input and its recomputation, for the demo's
//! kill-and-join run ([`processor::dev::demo::run_demo`]) and the tests.

use std::collections::BTreeMap;
use std::sync::Arc;

use processor::ProcessorResult;
use processor::dev::demo::DemoJob;
use processor::job::{Codec, Context, Input, Job, JobError, JobOperator, codec};
use processor::operator::Operator;
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::{Deserialize, Serialize};

/// One payment, as produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payment {
    /// Amount in cents.
    pub amount: i64,
    /// Where it was paid.
    pub merchant: String,
}

/// What the job keeps per account.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// Start of the current window (ms since the Unix epoch).
    pub window_start: i64,
    /// Payments in the current window.
    pub payments: u32,
    /// Their total (cents).
    pub total: i64,
    /// Alerts raised for the account, ever.
    pub alerts: u32,
    /// Payments seen for the account, ever.
    pub lifetime_payments: u64,
}

/// Published when an account crosses a limit within a window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    /// The window's start.
    pub window_start: i64,
    /// Payments in the window so far.
    pub payments: u32,
    /// Their total.
    pub total: i64,
    /// Which limit.
    pub reason: String,
}

/// The job: limits per account and window.
#[derive(Debug, Clone, Copy)]
pub struct FraudCounters {
    /// The window, in milliseconds.
    pub window_ms: i64,
    /// More payments than this in a window raise an alert.
    pub max_payments: u32,
    /// A total above this (cents) in a window raises an alert.
    pub max_total: i64,
}

impl Default for FraudCounters {
    /// One-minute windows, 5 payments, 5 000.00.
    fn default() -> Self {
        FraudCounters {
            window_ms: 60_000,
            max_payments: 5,
            max_total: 500_000,
        }
    }
}

impl FraudCounters {
    /// The account after `payment` at `timestamp`, and the alert it raises, if any. The whole logic,
    /// shared by the job and its recomputation.
    pub fn step(&self, account: Account, timestamp: i64, amount: i64) -> (Account, Option<Alert>) {
        let window_start = timestamp - timestamp.rem_euclid(self.window_ms);
        let mut next = account;
        if window_start > next.window_start {
            // A newer window: its counts start over. (A payment of an older window, out of order,
            // counts in the current one: the job is about bursts as they arrive.)
            next.window_start = window_start;
            next.payments = 0;
            next.total = 0;
        }
        let total_before = next.total;
        next.payments += 1;
        next.total += amount;
        next.lifetime_payments += 1;
        let reason = if next.payments == self.max_payments + 1 {
            Some(format!("more than {} payments", self.max_payments))
        } else if next.total > self.max_total && total_before <= self.max_total {
            Some(format!("more than {} cents", self.max_total))
        } else {
            None
        };
        let alert = reason.map(|reason| {
            next.alerts += 1;
            Alert {
                window_start: next.window_start,
                payments: next.payments,
                total: next.total,
                reason,
            }
        });
        (next, alert)
    }
}

impl Job for FraudCounters {
    type Key = String;
    type KeyCodec = codec::Utf8;
    type Value = Payment;
    type ValueCodec = codec::Json;
    type State = Account;
    type StateCodec = codec::Bincode;
    type Output = Alert;
    type OutputCodec = codec::Json;

    fn process(
        &self,
        input: Input<'_, String, Payment>,
        ctx: &mut Context<'_, Self>,
    ) -> Result<(), JobError> {
        let Some(timestamp) = input.timestamp else {
            return Err(JobError::reject("a payment without a timestamp"));
        };
        if input.value.amount <= 0 {
            return Err(JobError::reject(format!(
                "amount {} is not above zero",
                input.value.amount
            )));
        }
        let mut alert = None;
        ctx.update_state(|account| {
            let (next, raised) =
                self.step(account.unwrap_or_default(), timestamp, input.value.amount);
            alert = raised;
            Some(next)
        })?;
        if let Some(alert) = alert {
            ctx.emit(&alert)?;
        }
        Ok(())
    }

    fn render_state(&self, account: &Account) -> Option<serde_json::Value> {
        serde_json::to_value(account).ok()
    }
}

/// The job with a deterministic input of `payments` payments over `accounts` accounts (one every
/// 10 ms of payment time, bursts included), and its recomputation.
#[derive(Debug, Clone, Copy)]
pub struct PaymentsDemo {
    /// The job.
    pub job: FraudCounters,
    /// Payments in all.
    pub payments: u64,
    /// Accounts.
    pub accounts: u64,
}

/// A stateless 64-bit mix (splitmix64): payment `i` is the same on every run.
fn mix(i: u64) -> u64 {
    let mut z = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Payment time of the first payment: 2026-01-01T00:00:00Z.
const EPOCH_MS: i64 = 1_767_225_600_000;

impl PaymentsDemo {
    /// Payment `i`: account, timestamp, payment. Every 7th payment is a bad one (amount 0).
    pub fn payment(&self, i: u64) -> (String, i64, Payment) {
        let h = mix(i);
        // A few hot accounts get a tenth of the payments: they cross the limits.
        let account = if h.is_multiple_of(10) {
            h / 10 % 5
        } else {
            h / 10 % self.accounts.max(1)
        };
        let amount = if i % 7 == 6 {
            0
        } else {
            i64::try_from(h >> 40 & 0xFFFF).unwrap_or(0) + 1
        };
        (
            format!("acct-{account}"),
            EPOCH_MS + i64::try_from(i).unwrap_or(i64::MAX) * 10,
            Payment {
                amount,
                merchant: format!("m-{}", h % 97),
            },
        )
    }

    /// Every account's state after all payments (in input order, which is each account's partition
    /// order), by the job's own [`FraudCounters::step`].
    pub fn expected_accounts(&self) -> BTreeMap<String, Account> {
        let mut accounts: BTreeMap<String, Account> = BTreeMap::new();
        for i in 0..self.payments {
            let (key, timestamp, payment) = self.payment(i);
            if payment.amount <= 0 {
                continue;
            }
            let account = accounts.entry(key).or_default();
            *account = self.job.step(account.clone(), timestamp, payment.amount).0;
        }
        accounts
    }
}

impl DemoJob for PaymentsDemo {
    fn records(&self) -> u64 {
        self.payments
    }

    fn operator(&self) -> Arc<dyn Operator> {
        Arc::new(JobOperator::new(self.job))
    }

    fn produce<'a>(
        &'a self,
        brokers: &'a str,
        topic: &'a str,
        range: std::ops::Range<u64>,
    ) -> futures::future::BoxFuture<'a, ProcessorResult<()>> {
        Box::pin(async move {
            let kafka_error = |operation: &'static str| {
                move |err: rdkafka::error::KafkaError| processor::ProcessorError::Kafka {
                    operation,
                    source: Box::new(err),
                }
            };
            let producer: FutureProducer = ClientConfig::new()
                .set("bootstrap.servers", brokers)
                .set("enable.idempotence", "true")
                .set("linger.ms", "5")
                .create()
                .map_err(kafka_error("create a producer"))?;
            let mut pending = Vec::new();
            for i in range {
                let (key, timestamp, payment) = self.payment(i);
                let value = serde_json::to_vec(&payment).map_err(|err| {
                    processor::ProcessorError::Kafka {
                        operation: "encode a payment",
                        source: Box::new(err),
                    }
                })?;
                let record = FutureRecord::to(topic)
                    .key(&key)
                    .payload(&value)
                    .timestamp(timestamp);
                pending.push(
                    producer
                        .send_result(record)
                        .map_err(|(err, _)| kafka_error("queue a payment")(err))?,
                );
            }
            for delivery in pending {
                match delivery.await {
                    Ok(Ok(_)) => {}
                    Ok(Err((err, _))) => return Err(kafka_error("deliver a payment")(err)),
                    Err(_) => {
                        return Err(kafka_error("deliver a payment")(
                            rdkafka::error::KafkaError::Canceled,
                        ));
                    }
                }
            }
            Ok(())
        })
    }

    fn expected_state(&self) -> ProcessorResult<processor::inspect::StateEntries> {
        self.expected_accounts()
            .into_iter()
            .map(|(key, account)| {
                let mut value = Vec::new();
                codec::Bincode::encode(&account, &mut value).map_err(|err| {
                    processor::ProcessorError::Codec {
                        what: "an account",
                        operation: "encode",
                        source: err,
                    }
                })?;
                Ok((key.into_bytes(), value))
            })
            .collect()
    }
}
