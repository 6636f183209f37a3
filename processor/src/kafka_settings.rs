//! How an instance reaches Kafka: the bootstrap servers and any librdkafka client properties — SASL,
//! TLS, tuning — applied to every consumer and producer the instance makes. Secrets never appear in
//! `Debug` output.

use std::collections::BTreeMap;
use std::path::Path;

use rdkafka::ClientConfig;

use crate::error::{ProcessorError, ProcessorResult};

/// Properties the processor sets itself because its guarantees depend on them: exactly-once state needs
/// `assign()` from the stored offset, no auto-commit and no auto offset store, reads of committed
/// records only (`isolation.level`), an idempotent transactional producer per partition; brokers come
/// from `--brokers`.
const RESERVED: &[&str] = &[
    "bootstrap.servers",
    "metadata.broker.list",
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "enable.partition.eof",
    "auto.offset.reset",
    "isolation.level",
    "enable.idempotence",
    "transactional.id",
];

/// The properties librdkafka itself marks sensitive (`_RK_SENSITIVE` in `rdkafka_conf.c`, 2.12.1): it
/// redacts their values in its own dumps, and so do we.
const SENSITIVE: &[&str] = &[
    "ssl.key.location",
    "ssl.key.password",
    "ssl.key.pem",
    "ssl_key",
    "ssl.ca.pem",
    "ssl.keystore.password",
    "sasl.username",
    "sasl.password",
    "sasl.oauthbearer.config",
    "sasl.oauthbearer.client.secret",
    "sasl.oauthbearer.assertion.private.key.file",
    "sasl.oauthbearer.assertion.private.key.passphrase",
    "sasl.oauthbearer.assertion.private.key.pem",
];

/// Parts of property names whose values are secrets or may carry one, beyond [`SENSITIVE`]: a
/// future librdkafka's new credential, an alias (`…client.credentials.client.secret`), the keystore
/// and keytab, OAuth extensions (often a token), any inline PEM.
const SECRET_PARTS: &[&str] = &[
    "password",
    "passphrase",
    "secret",
    "token",
    "jaas",
    "credential",
    "key",
    "keystore",
    "keytab",
    "pem",
    "extensions",
];

/// Whether the value of the librdkafka property `key` is a secret: one librdkafka marks sensitive
/// (`ssl.key.pem`, `sasl.username`, …), or one whose name has a part that says so (`password`,
/// `secret`, `token`, `key`, `pem`, `credential`, …). A value is also hidden wherever it looks like a
/// PEM block, whatever its name.
pub fn is_secret(key: &str) -> bool {
    let key = key.trim().to_ascii_lowercase();
    SENSITIVE.contains(&key.as_str()) || SECRET_PARTS.iter().any(|part| key.contains(part))
}

/// Whether a property's value must be hidden: its name is a secret's ([`is_secret`]) or the value
/// itself is PEM text (a private key pasted under an unexpected name).
fn looks_secret(key: &str, value: &str) -> bool {
    is_secret(key) || value.contains("-----BEGIN")
}

/// The bootstrap servers and client properties of an instance.
#[derive(Clone, PartialEq, Eq)]
pub struct KafkaSettings {
    brokers: String,
    properties: BTreeMap<String, String>,
}

impl std::fmt::Debug for KafkaSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(key, value)| {
                let value = if looks_secret(key, value) {
                    "***"
                } else {
                    value.as_str()
                };
                (key.as_str(), value)
            })
            .collect();
        f.debug_struct("KafkaSettings")
            .field("brokers", &self.brokers)
            .field("properties", &shown)
            .finish()
    }
}

impl KafkaSettings {
    /// Settings with only the bootstrap servers (`host:port,host:port`).
    pub fn new(brokers: &str) -> Self {
        KafkaSettings {
            brokers: brokers.to_owned(),
            properties: BTreeMap::new(),
        }
    }

    /// Adds the librdkafka property `key` = `value` (a later value for the same key wins).
    ///
    /// # Errors
    /// [`ProcessorError::InvalidInput`] for an empty key or a property the processor sets itself.
    pub fn with_property(mut self, key: &str, value: &str) -> ProcessorResult<Self> {
        let key = key.trim();
        if key.is_empty() {
            return Err(ProcessorError::InvalidInput {
                what: "kafka config",
                reason: "a property needs a name: KEY=VALUE".to_owned(),
            });
        }
        if RESERVED.contains(&key) {
            let instead = match key {
                "bootstrap.servers" | "metadata.broker.list" => "use --brokers",
                "group.id" => "use --group",
                _ => "remove it",
            };
            return Err(ProcessorError::InvalidInput {
                what: "kafka config",
                reason: format!(
                    "`{key}` is set by the processor itself (its guarantees depend on it): {instead}"
                ),
            });
        }
        self.properties.insert(key.to_owned(), value.to_owned());
        Ok(self)
    }

    /// Adds every `KEY=VALUE` of `pairs` (the `--kafka-config` flag's form).
    ///
    /// # Errors
    /// [`ProcessorError::InvalidInput`] naming a pair without `=` (its value is never shown).
    pub fn with_pairs<'a>(
        mut self,
        pairs: impl IntoIterator<Item = &'a str>,
    ) -> ProcessorResult<Self> {
        for pair in pairs {
            let Some((key, value)) = pair.split_once('=') else {
                let key = pair.split_whitespace().next().unwrap_or_default();
                return Err(ProcessorError::InvalidInput {
                    what: "kafka config",
                    reason: format!("`{key}…` is not KEY=VALUE"),
                });
            };
            self = self.with_property(key, value)?;
        }
        Ok(self)
    }

    /// Adds the properties of a librdkafka-style file: one `KEY=VALUE` per line, `#` comments and
    /// blank lines ignored.
    ///
    /// # Errors
    /// An I/O error naming the file; [`ProcessorError::InvalidInput`] naming the bad line's number.
    pub fn with_file(mut self, path: &Path) -> ProcessorResult<Self> {
        let text = std::fs::read_to_string(path).map_err(ProcessorError::io(path))?;
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            self = self
                .with_pairs([line])
                .map_err(|err| ProcessorError::InvalidInput {
                    what: "kafka config file",
                    reason: format!("{}, line {}: {err}", path.display(), number + 1),
                })?;
        }
        Ok(self)
    }

    /// Maps an error creating a client to [`ProcessorError::Kafka`] with every property *value* cut out
    /// of librdkafka's message (it quotes the offending property with its value, and a mistyped secret's
    /// name does not look secret).
    pub(crate) fn client_error(
        &self,
        operation: &'static str,
    ) -> impl FnOnce(rdkafka::error::KafkaError) -> ProcessorError + '_ {
        move |err| ProcessorError::Kafka {
            operation,
            source: self.redact(&err.to_string()).into(),
        }
    }

    /// `message` with every property value cut out (see [`client_error`](Self::client_error)).
    pub(crate) fn redact(&self, message: &str) -> String {
        let mut message = message.to_owned();
        for value in self.properties.values().filter(|v| v.len() >= 2) {
            message = message.replace(value.as_str(), "***");
        }
        message
    }

    /// The bootstrap servers.
    pub fn brokers(&self) -> &str {
        &self.brokers
    }

    /// A client configuration with the servers and every property, to which the caller adds what its
    /// client needs (those settings win over the properties).
    pub(crate) fn client_config(&self) -> ClientConfig {
        self.client_config_over(&[])
    }

    /// As [`client_config`](Self::client_config), starting from `defaults`: tuning the processor
    /// picks for a client, which the user's properties override.
    pub(crate) fn client_config_over(&self, defaults: &[(&str, &str)]) -> ClientConfig {
        let mut config = ClientConfig::new();
        for (key, value) in defaults {
            config.set(*key, *value);
        }
        config.set("bootstrap.servers", &self.brokers);
        for (key, value) in &self.properties {
            config.set(key, value);
        }
        config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_are_checked_and_secrets_hidden() {
        let settings = KafkaSettings::new("b:9092")
            .with_pairs([
                "security.protocol=SASL_SSL",
                "sasl.password=hunter2",
                "x=a=b",
            ])
            .unwrap();
        let shown = format!("{settings:?}");
        assert!(
            shown.contains("SASL_SSL") && !shown.contains("hunter2"),
            "{shown}"
        );
        assert_eq!(
            settings.client_config().get("x"),
            Some("a=b"),
            "only the first = splits"
        );
        for bad in ["enable.auto.commit=true", "=1", "no-equals-sign"] {
            assert!(matches!(
                KafkaSettings::new("b:9092").with_pairs([bad]),
                Err(ProcessorError::InvalidInput { .. })
            ));
        }
        let err = KafkaSettings::new("b:9092")
            .with_pairs(["sasl.password hunter2"])
            .unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
        // A mistyped secret's name does not look secret; librdkafka quotes its value: cut out.
        let typo = KafkaSettings::new("b:9092")
            .with_pairs(["sasl.pasword=hunter2"])
            .unwrap();
        let err = typo
            .client_config()
            .create::<rdkafka::consumer::BaseConsumer>()
            .map_err(typo.client_error("create a consumer"))
            .err()
            .expect("an unknown property fails");
        let shown = format!("{err} {:?}", std::error::Error::source(&err));
        assert!(
            shown.contains("sasl.pasword") && !shown.contains("hunter2"),
            "{shown}"
        );
    }

    #[test]
    fn every_sensitive_property_and_any_pem_value_is_hidden() {
        // librdkafka's sensitive list, the aliases and look-alikes a user may type, keys and passphrases.
        let secrets = SENSITIVE.iter().copied().chain([
            "sasl.oauthbearer.client.credentials.client.secret",
            "sasl.oauthbearer.extensions",
            "ssl.keystore.location",
            "sasl.kerberos.keytab",
            "SSL.Key.PEM",
        ]);
        for key in secrets {
            let settings = KafkaSettings::new("b:9092")
                .with_property(key, "v4lue-hidden")
                .unwrap();
            let shown = format!("{settings:?}");
            assert!(!shown.contains("v4lue-hidden"), "{key}: {shown}");
        }
        let pasted = KafkaSettings::new("b:9092")
            .with_property("ssl.unknown", "-----BEGIN PRIVATE KEY-----abc")
            .unwrap();
        assert!(!format!("{pasted:?}").contains("PRIVATE"));
        let public = KafkaSettings::new("b:9092")
            .with_pairs([
                "security.protocol=SSL",
                "linger.ms=5",
                "ssl.certificate.location=/etc/c.crt",
            ])
            .unwrap();
        let shown = format!("{public:?}");
        for value in ["SSL", "\"5\"", "/etc/c.crt"] {
            assert!(shown.contains(value), "{value} hidden: {shown}");
        }
    }
}
