//! What limits are keyed by: client addresses, and fingerprints of credentials (never the
//! credentials themselves).

use std::net::IpAddr;

use sha2::{Digest, Sha256};

/// The limiter key of a client address. IPv4 (also written IPv4-mapped in IPv6) is the whole
/// address; IPv6 is its /64, because one host is routinely given a whole /64 and could otherwise
/// change address for every request.
pub fn address_key(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => u128::from(v4.to_ipv6_mapped()),
            None => u128::from(v6) & (u128::MAX << 64),
        },
    }
}

/// The first 128 bits of a credential's SHA-256: enough to tell credentials apart, useless for
/// recovering one, and what limiters remember instead of the secret. Its `Debug` shows nothing.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(u128);

impl Fingerprint {
    pub fn of(credential: &[u8]) -> Self {
        let digest = Sha256::digest(credential);
        let mut first = [0u8; 16];
        first.copy_from_slice(&digest[..16]);
        Self(u128::from_be_bytes(first))
    }

    /// The fingerprint as a number, to tell other replicas about it.
    pub fn bits(self) -> u128 {
        self.0
    }

    /// A fingerprint another replica sent as [`Fingerprint::bits`].
    pub fn from_bits(bits: u128) -> Self {
        Self(bits)
    }
}

impl std::fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Fingerprint(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    #[test]
    fn ipv6_hosts_in_one_slash_64_share_a_key_and_ipv4_is_exact() {
        assert_eq!(
            address_key(ip("2001:db8:1:2::1")),
            address_key(ip("2001:db8:1:2:ffff::9"))
        );
        assert_ne!(
            address_key(ip("2001:db8:1:2::1")),
            address_key(ip("2001:db8:1:3::1"))
        );
        assert_ne!(address_key(ip("127.0.0.1")), address_key(ip("127.0.0.2")));
        assert_eq!(
            address_key(ip("::ffff:10.0.0.1")),
            address_key(ip("10.0.0.1"))
        );
    }

    #[test]
    fn fingerprints_differ_per_credential_and_never_print_it() {
        let a = Fingerprint::of(b"secret-token-a");
        assert_eq!(a, Fingerprint::of(b"secret-token-a"));
        assert_ne!(a, Fingerprint::of(b"secret-token-b"));
        assert_eq!(format!("{a:?}"), "Fingerprint(..)");
    }
}
