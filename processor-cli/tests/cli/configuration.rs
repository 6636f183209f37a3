//! `processor run`'s settings from flags, environment variables and a TOML file, checked by
//! `processor config check` (no broker, no backend: it validates and prints).

#![allow(clippy::unwrap_used)]

use std::process::Output;

use crate::support::*;

fn config_check(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = processor(&["config", "check"]);
    command.args(args);
    for var in [
        "BROKERS",
        "TOPIC",
        "STATE_DIR",
        "CHECKPOINT_DIR",
        "LOCK_URL",
        "CLAIM_TTL_SECS",
        "CONFIG_FILE",
        "INSTANCE_ID",
    ] {
        command.env_remove(var);
    }
    command.envs(env.iter().copied());
    command.output().unwrap()
}

fn resolved(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "config check failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

const FILE: &str = r#"
brokers = "127.0.0.1:9092"
topic = "orders"
state_dir = "/var/lib/processor"
checkpoint-dir = "/shared/checkpoints"
lock_url = "redis://app:s3cret@127.0.0.1:6379"
claim_ttl_secs = 7
max_members = 200
kafka_config = ["sasl.password=hunter2", "client.id=ops", "ssl.key.pem=-----BEGIN PRIVATE KEY-----MIIEvQIBADAN", "ssl.keystore.password=kspass9", "sasl.oauthbearer.config=principal=svc token=tok3n"]
"#;

#[test]
fn a_file_sets_what_flags_and_environment_do_not_and_secrets_are_redacted() {
    let scratch = Scratch::new();
    let file = scratch.path().join("processor.toml");
    std::fs::write(&file, FILE).unwrap();
    let file = file.to_str().unwrap();

    let from_file = resolved(&config_check(&["--config", file], &[]));
    assert_eq!(from_file["brokers"], "127.0.0.1:9092");
    assert_eq!(from_file["claim_ttl_secs"], 7.0);
    assert_eq!(from_file["max_members"], 200);
    assert_eq!(from_file["checkpoint_interval_secs"], 2.0, "the default");
    assert_eq!(from_file["instance_id_generated"], true);
    let instance = from_file["instance_id"].as_str().unwrap();
    assert_eq!(instance.len(), 36, "a UUID: {instance}");
    assert_eq!(
        &instance[14..15],
        "7",
        "version 7 (time-ordered): {instance}"
    );
    let text = from_file.to_string();
    for secret in ["s3cret", "hunter2", "MIIEvQIBADAN", "kspass9", "tok3n"] {
        assert!(!text.contains(secret), "{secret} shown: {text}");
    }
    assert!(text.contains("client.id") && text.contains("ops"), "{text}");
    assert!(text.contains("redis://app:***@127.0.0.1:6379"), "{text}");

    // Environment over file, flag over environment.
    let layered = resolved(&config_check(
        &["--config", file, "--instance-id", "p7"],
        &[("CLAIM_TTL_SECS", "9"), ("INSTANCE_ID", "from-env")],
    ));
    assert_eq!(layered["claim_ttl_secs"], 9.0);
    assert_eq!(layered["instance_id"], "p7");
    // The file named by the environment.
    let by_env = resolved(&config_check(&[], &[("CONFIG_FILE", file)]));
    assert_eq!(by_env["topic"], "orders");
}

#[test]
fn bad_settings_are_refused_with_the_setting_named() {
    let scratch = Scratch::new();
    let write = |name: &str, extra: &str| {
        let path = scratch.path().join(name);
        std::fs::write(&path, format!("{FILE}{extra}\n")).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let cases = [
        (
            write("typo.toml", "clam_ttl = 3"),
            "unknown setting `clam-ttl`",
        ),
        (
            write("type.toml", "parallelism = \"many\""),
            "--parallelism",
        ),
        (
            write("range.toml", "maintenance_interval_secs = -1"),
            "--maintenance-interval-secs",
        ),
        (write("nested.toml", "[kafka]\nx = 1"), "`kafka` is a table"),
    ];
    for (file, expected) in cases {
        let out = config_check(&["--config", &file], &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{file} accepted");
        assert!(stderr.contains(expected), "{file}: {stderr}");
    }
    // Sizes out of range, names Kafka or a directory cannot take, properties the processor owns: one
    // line naming the setting and the value (before, `<< 20` wrapped or panicked on a huge size).
    let base = write("base.toml", "");
    let flags: [(&[&str], &str); 9] = [
        (&["--state-cache-mb", "0"], "--state-cache-mb"),
        (&["--block-cache-mb", "99999999999999"], "--block-cache-mb"),
        (&["--write-buffer-mb", "0"], "--write-buffer-mb"),
        (&["--topic", "orders:eu"], "topic"),
        (&["--group", "../etc"], "group"),
        (
            &["--kafka-config", "isolation.level=read_uncommitted"],
            "isolation.level",
        ),
        (
            &["--kafka-config", "enable.idempotence=false"],
            "enable.idempotence",
        ),
        (&["--http-token", "short"], "http token"),
        (&["--http-allowed-host", "http://x"], "http allowed host"),
    ];
    for (extra, expected) in flags {
        let mut argv = vec!["--config", base.as_str()];
        argv.extend_from_slice(extra);
        let out = config_check(&argv, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra:?} accepted");
        assert!(stderr.contains(expected), "{extra:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{extra:?}: {stderr}");
    }
    let not_toml = scratch.path().join("broken.toml");
    std::fs::write(&not_toml, "brokers = ").unwrap();
    let out = config_check(&["--config", not_toml.to_str().unwrap()], &[]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not valid TOML"));
    // Without the file, the required settings are missing.
    let out = config_check(&[], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--brokers"));
}
