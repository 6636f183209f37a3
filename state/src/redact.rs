//! Credentials never leave the crate: every URL that appears in `Debug` output, an error or a log line
//! goes through [`redact_url`] first.

/// Query parameters that carry a secret (matched case-insensitively, also as a part of the name, e.g.
/// `sslpassword`, `auth_token`).
const SECRET_PARAMETERS: &[&str] = &["pass", "pwd", "secret", "token", "auth", "key"];

/// `raw` with the password of its user-info and the value of every secret-looking query parameter
/// replaced by `***`; `(unparsable url)` when it is not a URL (so a malformed URL that holds a secret is
/// never echoed either).
pub fn redact_url(raw: &str) -> String {
    let Ok(mut parsed) = url::Url::parse(raw) else {
        return UNPARSABLE.to_owned();
    };
    if parsed.password().is_some() {
        // Only fails for URLs that cannot have a password, which this one has.
        let _ = parsed.set_password(Some("***"));
    }
    let secret = |name: &str| {
        let name = name.to_ascii_lowercase();
        SECRET_PARAMETERS.iter().any(|part| name.contains(part))
    };
    if parsed.query_pairs().any(|(name, _)| secret(&name)) {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(name, value)| {
                let value = if secret(&name) {
                    "***".to_owned()
                } else {
                    value.into_owned()
                };
                (name.into_owned(), value)
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.to_string()
}

/// What [`redact_url`] answers for a string that is not a URL.
const UNPARSABLE: &str = "(unparsable url)";

/// A lock URL as [`connect`](crate::connect::connect) takes it, redacted like [`redact_url`]: also
/// `memory`, shown as it is, and URLs of several hosts (`redlock://user:pass@h1:1,h2:2`,
/// `etcd://h1:2379,h2:2379`), which the `url` crate cannot parse: their hosts are shown, their
/// password and secret query parameters are not.
pub fn redact_lock_url(raw: &str) -> String {
    if raw == "memory" || raw == "memory://" {
        return raw.to_owned();
    }
    let redacted = redact_url(raw);
    if redacted != UNPARSABLE {
        return redacted;
    }
    let Some((scheme, rest)) = raw.split_once("://") else {
        return redacted;
    };
    // The hosts, set aside: the rest is redacted as the URL of one stand-in host.
    const STAND_IN: &str = "several-hosts.invalid";
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (stand_in, hosts) = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => (format!("{scheme}://{userinfo}@{STAND_IN}{tail}"), hosts),
        None => (format!("{scheme}://{STAND_IN}{tail}"), authority),
    };
    let shown = redact_url(&stand_in);
    if shown == UNPARSABLE {
        return shown;
    }
    shown.replacen(STAND_IN, hosts, 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_urls_of_several_hosts_are_redacted_too() {
        let cases = [
            ("memory", "memory"),
            (
                "redis://app:hunter2@127.0.0.1:6379",
                "redis://app:***@127.0.0.1:6379",
            ),
            (
                "redlock://app:hunter2@h1:1,h2:2,h3:3",
                "redlock://app:***@h1:1,h2:2,h3:3",
            ),
            (
                "redlock://h1:1,h2:2/0?auth_token=hunter2&x=1",
                "redlock://h1:1,h2:2/0?auth_token=***&x=1",
            ),
            ("etcd://h1:2379,h2:2379", "etcd://h1:2379,h2:2379"),
        ];
        for (raw, expected) in cases {
            let redacted = redact_lock_url(raw);
            assert_eq!(redacted, expected, "{raw}");
            assert!(!redacted.contains("hunter2"), "{redacted}");
        }
    }

    #[test]
    fn every_credential_form_is_redacted() {
        let cases = [
            (
                "postgres://app:hunter2@db:5432/app?sslmode=require",
                "postgres://app:***@db:5432/app?sslmode=require",
            ),
            (
                "postgres://app@db/app?password=hunter2&sslmode=require",
                "postgres://app@db/app?password=***&sslmode=require",
            ),
            (
                "postgresql://db/app?user=app&PassWord=hunter2&sslpassword=hunter2",
                "postgresql://db/app?user=app&PassWord=***&sslpassword=***",
            ),
            (
                "redis://:hunter2@127.0.0.1:6379/0",
                "redis://:***@127.0.0.1:6379/0",
            ),
            (
                "rediss://user:hunter2@cache:6380",
                "rediss://user:***@cache:6380",
            ),
            (
                "redis://cache:6379/?auth_token=hunter2",
                "redis://cache:6379/?auth_token=***",
            ),
        ];
        for (raw, expected) in cases {
            let redacted = redact_url(raw);
            assert_eq!(redacted, expected);
            assert!(!redacted.contains("hunter2"), "{redacted}");
        }
        assert_eq!(redact_url("::hunter2"), "(unparsable url)");
    }
}
