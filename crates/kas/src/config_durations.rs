//! The range each duration of kas's configuration must be in, and the values that are legal
//! but unwise.
//!
//! A duration is refused at start, naming its key and the range, when it makes a promise kas
//! cannot keep or undoes a protection: `agent.max_connection_age: 0s` broke every agent's
//! connection every few seconds with nothing saying why, `agent.authentication_timeout:
//! 100000d` let unauthenticated connections stay for good, `agent.token_recheck_interval:
//! 100000d` meant a revocation another replica did not announce never reached open streams
//! (E14). Values inside the range but far from what production needs (a connection rotated
//! every few seconds, a database query per live token every 100 ms) start, with a warning
//! naming the cost. The bounds leave room for the short values tests use.

use std::time::Duration;

use crate::config::Config;

/// One duration of the configuration and its range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bound {
    pub key: &'static str,
    pub value: Duration,
    pub min: Duration,
    pub max: Duration,
    /// Legal below this, but said at start with the reason.
    pub warn_below: Option<(Duration, &'static str)>,
}

const MS: Duration = Duration::from_millis(1);
const SEC: Duration = Duration::from_secs(1);
const MIN: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);

fn bound(key: &'static str, value: Duration, min: Duration, max: Duration) -> Bound {
    Bound {
        key,
        value,
        min,
        max,
        warn_below: None,
    }
}

impl Bound {
    fn warn_below(mut self, below: Duration, why: &'static str) -> Self {
        self.warn_below = Some((below, why));
        self
    }
}

/// The bounded durations of `cfg`.
pub fn bounds(cfg: &Config) -> Vec<Bound> {
    let (a, g) = (&cfg.agent, &cfg.git);
    vec![
        bound(
            "agent.max_connection_age",
            a.max_connection_age,
            SEC,
            30 * DAY,
        )
        .warn_below(
            MIN,
            "every agent reconnects that often (each rotation is a new TLS handshake and tunnel)",
        ),
        bound(
            "agent.max_connection_age_grace",
            a.max_connection_age_grace,
            Duration::ZERO,
            DAY,
        ),
        bound(
            "agent.keepalive_interval",
            a.keepalive_interval,
            100 * MS,
            HOUR,
        ),
        bound(
            "agent.keepalive_timeout",
            a.keepalive_timeout,
            100 * MS,
            10 * MIN,
        ),
        bound(
            "agent.authentication_timeout",
            a.authentication_timeout,
            100 * MS,
            10 * MIN,
        ),
        bound(
            "agent.tunnel_wait_timeout",
            a.tunnel_wait_timeout,
            MS,
            10 * MIN,
        ),
        bound(
            "agent.token_recheck_interval",
            a.token_recheck_interval,
            100 * MS,
            DAY,
        )
        .warn_below(SEC, "one database query per re-check of the live tokens"),
        bound("git.poll_interval", g.poll_interval, 100 * MS, 7 * DAY)
            .warn_below(SEC, "one fetch of every project with a remote per interval"),
        bound("git.fetch_timeout", g.fetch_timeout, 100 * MS, 2 * HOUR),
        bound(
            "gitops.render.chart_index_ttl",
            cfg.gitops.render.chart_index_ttl,
            Duration::ZERO,
            7 * DAY,
        ),
        bound(
            "gitops.render.timeout",
            cfg.gitops.render.timeout,
            MS,
            2 * HOUR,
        ),
        bound(
            "rate_limits.limited_response_delay",
            cfg.rate_limits.limited_response_delay,
            Duration::ZERO,
            MIN,
        ),
        bound("web.session_ttl", cfg.web.session_ttl, SEC, 90 * DAY),
    ]
}

/// The first duration out of its range, as the error kas refuses its configuration with.
pub fn check(bounds: &[Bound]) -> Result<(), String> {
    match bounds.iter().find(|b| b.value < b.min || b.value > b.max) {
        None => Ok(()),
        Some(b) => Err(format!(
            "{} is {}: it must be between {} and {}",
            b.key,
            show(b.value),
            show(b.min),
            show(b.max)
        )),
    }
}

/// A warning for each duration inside its range but below what production needs.
pub fn warnings(bounds: &[Bound]) -> Vec<String> {
    bounds
        .iter()
        .filter_map(|b| {
            let (below, why) = b.warn_below?;
            (b.value < below).then(|| {
                format!(
                    "{} is {} (under {}): {why}",
                    b.key,
                    show(b.value),
                    show(below)
                )
            })
        })
        .collect()
}

fn show(d: Duration) -> String {
    if d.is_zero() {
        return "0s".to_owned();
    }
    humantime::format_duration(d).to_string()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::default()
    }

    #[test]
    fn the_defaults_are_in_range_and_warn_of_nothing() {
        let b = bounds(&config());
        assert_eq!(check(&b), Ok(()));
        assert!(warnings(&b).is_empty(), "{:?}", warnings(&b));
    }

    #[test]
    fn a_duration_out_of_its_range_is_refused_naming_its_key_and_the_range() {
        let mut c = config();
        c.agent.max_connection_age = Duration::ZERO;
        assert_eq!(
            check(&bounds(&c)),
            Err("agent.max_connection_age is 0s: it must be between 1s and 30days".into())
        );
        let mut c = config();
        c.agent.authentication_timeout = 100_000 * DAY;
        let refused = check(&bounds(&c)).unwrap_err();
        assert!(
            refused.starts_with("agent.authentication_timeout is 273years")
                && refused.ends_with("it must be between 100ms and 10m"),
            "{refused}"
        );
    }

    #[test]
    fn a_legal_but_costly_duration_is_warned_of() {
        let mut c = config();
        c.agent.max_connection_age = 3 * SEC;
        c.git.poll_interval = 300 * MS;
        assert_eq!(check(&bounds(&c)), Ok(()), "tests use such values");
        let said = warnings(&bounds(&c));
        assert_eq!(said.len(), 2, "{said:?}");
        assert!(
            said[0]
                .starts_with("agent.max_connection_age is 3s (under 1m): every agent reconnects"),
            "{said:?}"
        );
    }
}
