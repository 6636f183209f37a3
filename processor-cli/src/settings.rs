//! Where `run`'s settings come from: its flags, then their environment variables, then the TOML file
//! named by `--config` (or `CONFIG_FILE`), then the defaults — and `processor config check`, which
//! prints the result with secrets redacted.
//!
//! The file's values become the defaults of the flags they name (clap then applies flags and
//! environment variables over them), so every setting is checked by the same parser whatever its
//! source. A key that names no flag is an error, not a silently ignored typo.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{CommandFactory, FromArgMatches};

use crate::args::{Cli, RunArgs};

/// The subcommands whose arguments are `RunArgs`, as paths from the top command.
const RUN_COMMANDS: &[&[&str]] = &[&["run"], &["config", "check"]];

/// Parses the command line, with the `--config` file's settings as defaults of `run` and `config
/// check`. Clap's own errors (and `--help`) print and exit as usual.
///
/// # Errors
/// The file cannot be read, is not TOML, or names a setting that does not exist or has a value of the
/// wrong type.
pub fn parse_cli() -> anyhow::Result<Cli> {
    let argv: Vec<OsString> = std::env::args_os().collect();
    let mut command = Cli::command();
    if let Some(file) = config_file(&argv) {
        let settings = read_settings(&file)?;
        for path in RUN_COMMANDS {
            command = with_file_defaults(command, path, &settings, &file)?;
        }
    }
    let matches = command.get_matches_from(argv);
    Ok(Cli::from_arg_matches(&matches)?)
}

/// The `--config` file: the flag's value, else `CONFIG_FILE`.
fn config_file(argv: &[OsString]) -> Option<PathBuf> {
    let mut args = argv.iter().map(|a| a.to_string_lossy().into_owned());
    while let Some(arg) = args.next() {
        if arg == "--config" {
            return args.next().map(PathBuf::from);
        }
        if let Some(value) = arg.strip_prefix("--config=") {
            return Some(PathBuf::from(value));
        }
    }
    std::env::var_os("CONFIG_FILE").map(PathBuf::from)
}

/// The file's settings as `(flag name, values)`, keys normalised to flag spelling (`claim_ttl_secs` →
/// `claim-ttl-secs`).
fn read_settings(file: &Path) -> anyhow::Result<Vec<(String, Vec<String>)>> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("config file {}: cannot be read", file.display()))?;
    let table: toml::Table = toml::from_str(&text)
        .with_context(|| format!("config file {}: not valid TOML", file.display()))?;
    table
        .into_iter()
        .map(|(key, value)| {
            let values = match value {
                toml::Value::Array(items) => items
                    .into_iter()
                    .map(|item| scalar(file, &key, item))
                    .collect::<anyhow::Result<Vec<_>>>()?,
                other => vec![scalar(file, &key, other)?],
            };
            Ok((key.replace('_', "-"), values))
        })
        .collect()
}

fn scalar(file: &Path, key: &str, value: toml::Value) -> anyhow::Result<String> {
    Ok(match value {
        toml::Value::String(text) => text,
        toml::Value::Integer(n) => n.to_string(),
        toml::Value::Float(x) => x.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        other => bail!(
            "config file {}: `{key}` is a {}; give a string, number or boolean (or a list of them)",
            file.display(),
            other.type_str()
        ),
    })
}

/// `command` with the file's settings as the defaults of the subcommand at `path`.
fn with_file_defaults(
    command: clap::Command,
    path: &[&str],
    settings: &[(String, Vec<String>)],
    file: &Path,
) -> anyhow::Result<clap::Command> {
    let Some((first, rest)) = path.split_first() else {
        return apply(command, settings, file);
    };
    let mut outcome = Ok(());
    let command = command.mut_subcommand(*first, |sub| {
        match with_file_defaults(sub.clone(), rest, settings, file) {
            Ok(updated) => updated,
            Err(err) => {
                outcome = Err(err);
                sub
            }
        }
    });
    outcome.map(|()| command)
}

fn apply(
    mut command: clap::Command,
    settings: &[(String, Vec<String>)],
    file: &Path,
) -> anyhow::Result<clap::Command> {
    for (key, values) in settings {
        let Some(id) = command
            .get_arguments()
            .find(|arg| arg.get_long() == Some(key.as_str()))
            .map(|arg| arg.get_id().clone())
        else {
            let mut known: Vec<&str> = command
                .get_arguments()
                .filter_map(clap::Arg::get_long)
                .filter(|long| *long != "config" && *long != "help")
                .collect();
            known.sort_unstable();
            bail!(
                "config file {}: unknown setting `{key}` (settings are the flag names: {})",
                file.display(),
                known.join(", ")
            );
        };
        if key == "config" {
            bail!(
                "config file {}: `config` cannot name another file",
                file.display()
            );
        }
        // Parsed once at start; clap keeps defaults as `'static` strings.
        let leaked: Vec<&'static str> = values
            .iter()
            .map(|value| &*Box::leak(value.clone().into_boxed_str()))
            .collect();
        command = command.mut_arg(id, |arg| arg.required(false).default_values(leaked));
    }
    Ok(command)
}

/// `processor config check`: validates the resolved settings as `run` would (without connecting) and
/// prints them as JSON, secrets redacted.
///
/// # Errors
/// The first invalid setting.
pub fn check(args: &RunArgs) -> anyhow::Result<()> {
    let lock_url = crate::fleet_lock_url(args)?.to_owned();
    args.checkpoints.location(&args.group)?;
    let instance_id = crate::resolved_instance_id(args);
    let config = crate::instance_config(args, &instance_id)?;
    let resolved = serde_json::json!({
        "instance_id": instance_id,
        "instance_id_generated": args.instance_id.is_none(),
        "group": config.group,
        "topic": config.topic,
        "partitions": args.partitions,
        "brokers": config.kafka.brokers(),
        "kafka": format!("{:?}", config.kafka),
        "lock_url": state::redact_lock_url(&lock_url),
        "state_dir": config.state_dir,
        "checkpoint_dir": args.checkpoints.checkpoint_dir,
        "checkpoint_url": args.checkpoints.checkpoint_url,
        "create_checkpoint_dir": args.create_checkpoint_dir,
        "claim_ttl_secs": config.claim_ttl.as_secs_f64(),
        "checkpoint_interval_secs": config.checkpoint_every.as_secs_f64(),
        "maintenance_interval_secs": config.maintenance.every.as_secs_f64(),
        "keep_checkpoints": config.maintenance.keep_checkpoints,
        "topology_refresh_secs": config.topology_refresh.map(|every| every.as_secs_f64()),
        "parallelism": config.parallelism,
        "commit_records": config.batch_size,
        "commit_interval_ms": config.commit_interval.as_millis(),
        "state_cache_bytes": config.state_cache_bytes,
        "standby_replicas": config.standby_replicas,
        "rejected_record_pause_secs": config.rejected_record_pause.as_secs_f64(),
        "output_mode": format!("{:?}", config.output_mode),
        "block_cache_bytes": crate::args::mib_to_bytes(args.block_cache_mb),
        "write_buffer_bytes": crate::args::mib_to_bytes(args.write_buffer_mb),
        "commit_coalescing_bytes": crate::args::mib_to_bytes(args.commit_coalescing_mb),
        "max_members": config.max_members,
        "output_topic": config.output_topic,
        "output_guarantee": format!("{:?}", config.output_guarantee),
        "dead_letter_topic": config.dead_letter_topic,
        "on_missing_offsets": format!("{:?}", config.on_missing_offsets),
        "restore_older_checkpoint": config.restore_older_checkpoint,
        "stall_timeout_secs": config.stall_timeout.map(|bound| bound.as_secs_f64()),
        "shutdown_timeout_secs": config.shutdown_bound().as_secs_f64(),
        "http": args.http,
        "http_advertise": args.http_advertise,
        "http_access": format!("{:?}", crate::http_access(args)?),
        "config_file": args.config,
    });
    println!("{}", serde_json::to_string_pretty(&resolved)?);
    Ok(())
}
