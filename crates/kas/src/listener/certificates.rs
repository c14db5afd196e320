//! When the certificates kas's listeners serve expire: a gauge to alert on, and the log ahead
//! of time.
//!
//! A certificate that its issuer (cert-manager, an internal CA job) failed to renew was found
//! only when every agent and CI job was refused, while kas's log and metrics stayed quiet (E14).
//! Each listener's certificate is read again from its files (as a handshake does) every
//! [`CHECK_EVERY`]: `kas_tls_certificate_expiry_timestamp_seconds{listener}` is its `notAfter`,
//! and the log says where it stands when it changes — at start, at each renewal, when it comes
//! within its warning period (warn), expires (error) or is not valid yet (warn) — and again
//! every [`REMIND_EVERY`] while it is not plainly valid.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tether_transport::{ServedCertificate, Standing, Validity};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::metrics::ListenerLabels;

/// How often each served certificate is looked at.
pub const CHECK_EVERY: Duration = Duration::from_secs(60);

/// How often a certificate that is expiring, expired or not valid yet is said again.
pub const REMIND_EVERY: Duration = Duration::from_secs(3600);

/// The longest warning period: a certificate is said to expire soon within a quarter of its
/// lifetime, and never earlier than this before its expiry. (cert-manager renews a third of
/// the lifetime before expiry, so the warning means renewals have been failing for a while.)
const WARN_AT_MOST: Duration = Duration::from_secs(14 * 86_400);

/// The served certificates, by listener.
#[derive(Debug, Clone, Default)]
pub struct Certificates {
    expiry: Family<ListenerLabels, Gauge>,
    served: Arc<Mutex<HashMap<&'static str, Followed>>>,
}

#[derive(Debug)]
struct Followed {
    cert: ServedCertificate,
    /// What was last said, and when.
    said: Option<(Said, Instant)>,
}

/// What the log said of a certificate: its standing's kind and its validity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Said {
    kind: Kind,
    validity: Option<Validity>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Valid,
    ExpiringSoon,
    Expired,
    NotYetValid,
    Unreadable,
}

impl Certificates {
    pub fn register(&self, reg: &mut Registry) {
        reg.register(
            "tls_certificate_expiry_timestamp_seconds",
            "When the TLS certificate each listener serves expires (its notAfter, Unix seconds), read again from its files every minute; alert well before it",
            self.expiry.clone(),
        );
    }

    /// Follows the certificate `listener` serves, and says now where it stands.
    pub fn follow(&self, listener: &'static str, cert: ServedCertificate) {
        let mut served = self.lock();
        let followed = served
            .entry(listener)
            .or_insert(Followed { cert, said: None });
        self.check(listener, followed, SystemTime::now(), Instant::now());
    }

    /// Looks at every followed certificate each [`CHECK_EVERY`] until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(CHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => return,
            }
            let mut served = self.lock();
            for (listener, followed) in served.iter_mut() {
                self.check(listener, followed, SystemTime::now(), Instant::now());
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<&'static str, Followed>> {
        // Each update is one field's assignment: consistent across a panic.
        self.served.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn check(&self, listener: &'static str, f: &mut Followed, now: SystemTime, at: Instant) {
        let validity = f.cert.validity();
        if let Some(v) = validity {
            let secs = v.not_after.duration_since(UNIX_EPOCH).unwrap_or_default();
            let labels = ListenerLabels {
                listener: listener.to_owned(),
            };
            let secs = i64::try_from(secs.as_secs()).unwrap_or(i64::MAX);
            self.expiry.get_or_create(&labels).set(secs);
        }
        let standing = validity.map(|v| v.standing(now, warn_before(&v)));
        let said = Said {
            kind: kind(standing),
            validity,
        };
        if !due(f.said, said, at) {
            return;
        }
        f.said = Some((said, at));
        say(listener, f.cert.file(), validity, standing);
    }
}

/// Whether to say `now` again: it changed, or it is still not plainly valid and was last said
/// [`REMIND_EVERY`] ago.
fn due(last: Option<(Said, Instant)>, now: Said, at: Instant) -> bool {
    match last {
        None => true,
        Some((said, _)) if said != now => true,
        Some((_, when)) => now.kind != Kind::Valid && at.duration_since(when) >= REMIND_EVERY,
    }
}

/// The warning period of a certificate with this validity.
fn warn_before(v: &Validity) -> Duration {
    let lifetime = v.not_after.duration_since(v.not_before).unwrap_or_default();
    (lifetime / 4).min(WARN_AT_MOST)
}

fn kind(standing: Option<Standing>) -> Kind {
    match standing {
        Some(Standing::Valid { .. }) => Kind::Valid,
        Some(Standing::ExpiringSoon { .. }) => Kind::ExpiringSoon,
        Some(Standing::Expired { .. }) => Kind::Expired,
        Some(Standing::NotYetValid { .. }) => Kind::NotYetValid,
        None => Kind::Unreadable,
    }
}

fn say(
    listener: &str,
    file: &std::path::Path,
    validity: Option<Validity>,
    standing: Option<Standing>,
) {
    let file = file.display();
    let stamp = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
    let (not_before, not_after) = validity.map_or((String::new(), String::new()), |v| {
        (stamp(v.not_before), stamp(v.not_after))
    });
    let days = |d: Duration| format!("{:.1}", d.as_secs_f64() / 86_400.0);
    match standing {
        Some(Standing::Valid { left }) => {
            tracing::info!(listener, certificate_file = %file, not_after, days_left = days(left), "Serving a TLS certificate");
        }
        Some(Standing::ExpiringSoon { left }) => {
            tracing::warn!(listener, certificate_file = %file, not_after, days_left = days(left), "The TLS certificate kas serves expires soon and has not been renewed: renew it (kas reloads the files without a restart)");
        }
        Some(Standing::Expired { since }) => {
            tracing::error!(listener, certificate_file = %file, not_after, days_ago = days(since), "The TLS certificate kas serves has expired: agents and clients refuse it; renew it (kas reloads the files without a restart)");
        }
        Some(Standing::NotYetValid { until }) => {
            tracing::warn!(listener, certificate_file = %file, not_before, seconds_until_valid = until.as_secs(), "The TLS certificate kas serves is not valid yet by kas's clock: clients whose clocks agree refuse it until then (issue certificates with notBefore a few minutes back, or check this host's clock)");
        }
        None => {
            tracing::warn!(listener, certificate_file = %file, "Cannot read the validity of the TLS certificate kas serves (not an X.509 certificate kas can parse); its expiry is not followed");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn validity(lifetime_days: u64) -> Validity {
        let not_before = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        Validity {
            not_before,
            not_after: not_before + Duration::from_secs(lifetime_days * 86_400),
        }
    }

    #[test]
    fn a_certificate_warns_a_quarter_of_its_lifetime_ahead_and_at_most_two_weeks() {
        let day = Duration::from_secs(86_400);
        assert_eq!(
            warn_before(&validity(90)),
            14 * day,
            "cert-manager's default"
        );
        assert_eq!(warn_before(&validity(1)), day / 4, "a one-day certificate");
        assert_eq!(warn_before(&validity(365)), 14 * day);
    }

    #[test]
    fn a_standing_is_said_when_it_changes_and_again_hourly_only_while_not_plainly_valid() {
        let t0 = Instant::now();
        let said = |kind, days| Said {
            kind,
            validity: Some(validity(days)),
        };
        let valid = said(Kind::Valid, 90);
        assert!(due(None, valid, t0), "at start");
        assert!(!due(Some((valid, t0)), valid, t0 + 2 * REMIND_EVERY));
        let soon = said(Kind::ExpiringSoon, 90);
        assert!(
            due(Some((valid, t0)), soon, t0 + CHECK_EVERY),
            "came within its warning"
        );
        assert!(!due(Some((soon, t0)), soon, t0 + REMIND_EVERY / 2));
        assert!(due(Some((soon, t0)), soon, t0 + REMIND_EVERY), "reminded");
        let renewed = said(Kind::Valid, 91);
        assert!(due(Some((soon, t0)), renewed, t0 + CHECK_EVERY), "renewed");
        let expired = said(Kind::Expired, 90);
        assert!(due(Some((soon, t0)), expired, t0 + CHECK_EVERY), "expired");
    }
}
