//! When a certificate is valid: its `notBefore` and `notAfter`, read from its DER.
//!
//! kas reports when the certificates it serves expire (a gauge to alert on, a warning days
//! ahead): a certificate that cert-manager failed to renew over a weekend was otherwise found
//! when every agent and CI job was refused, with kas's logs and metrics quiet (E14). Only the
//! validity is read, by walking the few DER elements before it (X.509, RFC 5280 §4.1), so no
//! ASN.1 library is needed for two dates.

use std::time::{Duration, SystemTime};

/// A certificate's validity period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// Where a certificate stands at a moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Valid, and for longer than the warning period.
    Valid { left: Duration },
    /// Valid, but expiring within the warning period.
    ExpiringSoon { left: Duration },
    /// Past its `notAfter`.
    Expired { since: Duration },
    /// Before its `notBefore` (a clock behind, or a certificate issued for later).
    NotYetValid { until: Duration },
}

impl Validity {
    /// Where the certificate stands at `now`, warning `warn_before` its expiry.
    pub fn standing(&self, now: SystemTime, warn_before: Duration) -> Standing {
        if let Ok(until) = self.not_before.duration_since(now)
            && !until.is_zero()
        {
            return Standing::NotYetValid { until };
        }
        match self.not_after.duration_since(now) {
            Ok(left) if left > warn_before => Standing::Valid { left },
            Ok(left) if !left.is_zero() => Standing::ExpiringSoon { left },
            _ => Standing::Expired {
                since: now.duration_since(self.not_after).unwrap_or_default(),
            },
        }
    }
}

/// The validity of a DER-encoded X.509 certificate; `None` when it is not one.
pub fn validity(der: &[u8]) -> Option<Validity> {
    let (cert, _) = element(der, SEQUENCE)?;
    let (mut tbs, _) = element(cert, SEQUENCE)?;
    // [0] EXPLICIT version, present in every v3 certificate.
    if tbs.first() == Some(&0xa0) {
        tbs = element(tbs, 0xa0)?.1;
    }
    let (_serial, rest) = element(tbs, 0x02)?;
    let (_signature, rest) = element(rest, SEQUENCE)?;
    let (_issuer, rest) = element(rest, SEQUENCE)?;
    let (validity, _) = element(rest, SEQUENCE)?;
    let (not_before, rest) = time(validity)?;
    let (not_after, _) = time(rest)?;
    Some(Validity {
        not_before,
        not_after,
    })
}

const SEQUENCE: u8 = 0x30;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;

/// The contents of the element at the start of `der` if its tag is `tag`, and what follows it.
fn element(der: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&found, rest) = der.split_first()?;
    if found != tag {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| rest.split_at(len))
}

/// A UTCTime (`YYMMDDHHMMSSZ`, years 1950–2049) or GeneralizedTime (`YYYYMMDDHHMMSSZ`) at the
/// start of `der`, and what follows it.
fn time(der: &[u8]) -> Option<(SystemTime, &[u8])> {
    let (text, digits_of_year) = match *der.first()? {
        UTC_TIME => (element(der, UTC_TIME)?, 2),
        GENERALIZED_TIME => (element(der, GENERALIZED_TIME)?, 4),
        _ => return None,
    };
    let (text, after) = text;
    let s = std::str::from_utf8(text).ok()?.strip_suffix('Z')?;
    if s.len() != digits_of_year + 10 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (year, fields) = s.split_at(digits_of_year);
    let year = match year.parse::<u32>().ok()? {
        y if digits_of_year == 2 && y < 50 => 2000 + y,
        y if digits_of_year == 2 => 1900 + y,
        y => y,
    };
    let at = |i: usize| fields.get(i..i + 2).unwrap_or("00");
    let rfc3339 = format!(
        "{year:04}-{}-{}T{}:{}:{}Z",
        at(0),
        at(2),
        at(4),
        at(6),
        at(8)
    );
    Some((humantime::parse_rfc3339(&rfc3339).ok()?, after))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    /// A certificate made with these dates, as DER.
    fn certificate(not_before: (i32, u8, u8), not_after: (i32, u8, u8)) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(vec!["kas.example".to_owned()]).unwrap();
        params.not_before = rcgen::date_time_ymd(not_before.0, not_before.1, not_before.2);
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    /// UTCTime (before 2050) and GeneralizedTime (from 2050) both read, to the second.
    #[test]
    fn the_validity_of_a_certificate_is_read_from_its_der() {
        let v = validity(&certificate((2026, 11, 29), (2027, 2, 27))).unwrap();
        assert_eq!(v.not_before, at(1_795_910_400), "2026-11-29T00:00:00Z");
        assert_eq!(v.not_after, at(1_803_686_400), "2027-02-27T00:00:00Z");
        let v = validity(&certificate((1999, 12, 31), (2051, 3, 1))).unwrap();
        assert_eq!(v.not_before, at(946_598_400), "1999-12-31T00:00:00Z");
        assert_eq!(v.not_after, at(2_561_241_600), "2051-03-01T00:00:00Z");
    }

    #[test]
    fn what_is_not_a_certificate_has_no_validity() {
        let der = certificate((2026, 11, 29), (2027, 2, 27));
        assert_eq!(validity(&der[..der.len() / 2]), None, "cut short");
        assert_eq!(validity(b"-----BEGIN CERTIFICATE-----"), None);
        assert_eq!(validity(&[]), None);
        assert_eq!(validity(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
    }

    #[test]
    fn a_certificate_stands_valid_expiring_expired_or_not_yet_valid() {
        let v = Validity {
            not_before: at(1_000),
            not_after: at(1_000_000),
        };
        let week = Duration::from_secs(7 * 86_400);
        let s = |now| v.standing(at(now), week);
        assert_eq!(
            s(1_000),
            Standing::Valid {
                left: Duration::from_secs(999_000)
            }
        );
        assert_eq!(
            s(1_000_000 - 3_600),
            Standing::ExpiringSoon {
                left: Duration::from_secs(3_600)
            }
        );
        assert_eq!(
            s(1_000_000),
            Standing::Expired {
                since: Duration::ZERO
            }
        );
        assert_eq!(
            s(1_000_060),
            Standing::Expired {
                since: Duration::from_secs(60)
            }
        );
        assert_eq!(
            s(700),
            Standing::NotYetValid {
                until: Duration::from_secs(300)
            }
        );
    }
}
