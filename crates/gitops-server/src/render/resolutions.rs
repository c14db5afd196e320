//! What a chart resolved to, kept on disk beside the archive cache: after a restart while its
//! repository is down, kas still knows which archive (likely cached) a chart and constraint
//! resolved to, instead of failing for want of the index it held only in memory. Pure: the
//! record, its file name and the warning that a resolution is not fresh.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::dependencies::{Dependency, Resolved, sha256_hex};

/// The last resolution of one (repository, chart, constraint), with when its index was fetched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The repository, chart and constraint as asked (the file name is their digest; these
    /// are compared on reading, so a record is never used for another chart).
    pub repository: String,
    pub chart: String,
    pub constraint: String,
    /// When the index it was resolved in was fetched (Unix seconds).
    pub fetched_at: u64,
    /// The version chosen, its archive's URL and SHA-256.
    pub version: String,
    pub url: String,
    pub digest: String,
    /// The digest of a registry chart's manifest (`sha256:<hex>`): a re-resolution choosing
    /// the same tag asks only whether the tag still names it (`HEAD`), which registries
    /// counting pulls do not count. Absent in records of index charts and of earlier kas
    /// versions (their manifest is read once again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<String>,
}

impl Record {
    /// The record of `chart` resolving to `resolved` (of the registry manifest of digest
    /// `manifest`) in an index fetched at `fetched_at`.
    pub fn new(
        chart: &Dependency,
        resolved: &Resolved,
        manifest: Option<String>,
        fetched_at: SystemTime,
    ) -> Self {
        Self {
            repository: chart.repository.clone(),
            chart: chart.name.clone(),
            constraint: chart.version.clone(),
            fetched_at: fetched_at
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            version: resolved.version.clone(),
            url: resolved.url.clone(),
            digest: resolved.digest.clone(),
            manifest,
        }
    }

    /// The record's bytes on disk.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The record of `bytes` if it is one for `chart` with a well-formed digest (a file edited
    /// by hand or cut short is not used: the chart then fails as if none were kept).
    pub fn decode(bytes: &[u8], chart: &Dependency) -> Option<Self> {
        let r: Record = serde_json::from_slice(bytes).ok()?;
        let well_formed = r.digest.len() == 64 && r.digest.bytes().all(|b| b.is_ascii_hexdigit());
        let same = r.repository == chart.repository
            && r.chart == chart.name
            && r.constraint == chart.version;
        (same && well_formed && !r.version.is_empty()).then_some(r)
    }

    /// What it resolved to.
    pub fn resolved(&self) -> Resolved {
        Resolved {
            name: self.chart.clone(),
            version: self.version.clone(),
            url: self.url.clone(),
            digest: self.digest.clone(),
        }
    }

    /// When its index was fetched.
    pub fn fetched_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.fetched_at)
    }
}

/// The file of `chart`'s record: a digest of what was asked, so any URL, name or constraint
/// makes a plain file name.
pub fn file_name(chart: &Dependency) -> String {
    let asked = format!("{}\n{}\n{}", chart.repository, chart.name, chart.version);
    format!("{}.resolved.json", sha256_hex(asked.as_bytes()))
}

/// A resolution made without a fresh index: the repository could not be read, so the index
/// fetched earlier (kept in memory, or the resolution kept on disk) was used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stale {
    /// The repository that could not be read.
    pub repository: String,
    /// When the index used was fetched.
    pub fetched_at: SystemTime,
    /// Why the repository could not be read.
    pub error: String,
}

impl Stale {
    /// The warning shown in the project's status and kas's log.
    pub fn warning(&self) -> String {
        format!(
            "chart repository {} unreachable: using index fetched at {} ({}); a version published since is applied once it answers again",
            self.repository,
            humantime::format_rfc3339_seconds(self.fetched_at),
            self.error
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn chart(constraint: &str) -> Dependency {
        Dependency {
            name: "greeter".into(),
            version: constraint.into(),
            repository: "https://charts.example.com/stable".into(),
        }
    }

    fn resolved() -> Resolved {
        Resolved {
            name: "greeter".into(),
            version: "1.1.0".into(),
            url: "https://charts.example.com/stable/greeter-1.1.0.tgz".into(),
            digest: "ab".repeat(32),
        }
    }

    #[test]
    fn a_record_reads_back_as_its_resolution_only_for_the_chart_and_constraint_it_was_made_for() {
        let at = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let record = Record::new(&chart(">=1 <2"), &resolved(), None, at);
        let bytes = record.encode();
        let back = Record::decode(&bytes, &chart(">=1 <2")).unwrap();
        assert_eq!(back.resolved(), resolved());
        assert_eq!(back.fetched_at(), at);
        assert!(Record::decode(&bytes, &chart("~1.0")).is_none());
        let mut other = chart(">=1 <2");
        other.repository = "https://charts.example.com/other".into();
        assert!(Record::decode(&bytes, &other).is_none());
        assert!(Record::decode(&bytes[..bytes.len() / 2], &chart(">=1 <2")).is_none());
        let mut bad = record;
        bad.digest = "../../etc".into();
        assert!(Record::decode(&bad.encode(), &chart(">=1 <2")).is_none());
    }

    #[test]
    fn a_registry_charts_record_keeps_its_manifest_and_earlier_records_still_read() {
        let at = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let manifest = Some(format!("sha256:{}", "cd".repeat(32)));
        let record = Record::new(&chart("~1.1"), &resolved(), manifest.clone(), at);
        let back = Record::decode(&record.encode(), &chart("~1.1")).unwrap();
        assert_eq!(back.manifest, manifest);
        // As the previous version wrote it: no manifest; read, its manifest to be read again.
        let earlier = br#"{"repository":"https://charts.example.com/stable","chart":"greeter","constraint":"~1.1","fetched_at":1700000000,"version":"1.1.0","url":"https://charts.example.com/stable/greeter-1.1.0.tgz","digest":"abababababababababababababababababababababababababababababababab"}"#;
        let old = Record::decode(earlier, &chart("~1.1")).unwrap();
        assert_eq!((old.resolved(), old.manifest), (resolved(), None));
    }

    #[test]
    fn each_chart_and_constraint_has_its_own_plain_file_name() {
        let (a, b) = (file_name(&chart("~1.0")), file_name(&chart("~1.1")));
        assert_ne!(a, b);
        assert!(a.ends_with(".resolved.json"));
        assert!(!a.contains('/'));
        assert_eq!(a, file_name(&chart("~1.0")));
    }

    #[test]
    fn the_stale_warning_names_the_repository_and_when_its_index_was_fetched() {
        let stale = Stale {
            repository: "https://charts.example.com/stable".into(),
            fetched_at: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            error: "Connection refused".into(),
        };
        assert!(stale.warning().starts_with(
            "chart repository https://charts.example.com/stable unreachable: using index fetched at 2023-11-14T22:13:20Z (Connection refused)"
        ));
    }
}
