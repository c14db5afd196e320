//! Each chart's last resolution kept on disk (see [`crate::render::resolutions`]), and its
//! trimming: one record per (repository, chart, constraint) ever resolved, so a constraint
//! changed, an entry removed or an agent gone leaves a record nobody reads again. A record's
//! file time is its last use (written, or renewed at most every [`RENEW`] while charts use it),
//! and records unused for [`UNUSED`] are deleted, checked at most every [`RENEW`].

use std::collections::HashMap;
use std::path::Path;
use std::sync::PoisonError;
use std::time::{Duration, Instant, SystemTime};

use super::{ChartFetcher, write_file};
use crate::render::dependencies::{Dependency, Resolved};
use crate::render::resolutions::{self, Record};

/// How long a record nobody used is kept: 30 days. A record serves only when its repository is
/// down at a kas restart; every entry in use re-resolves at `chart_index_ttl`, renewing its
/// record hourly. Thirty days outlast a cluster (and its agent) switched off over holidays or a
/// long outage, and bound the files left by changed constraints and removed entries (a few
/// hundred bytes each) to those of one month.
pub(super) const UNUSED: Duration = Duration::from_secs(30 * 24 * 3600);
/// How often a record in use has its time of use renewed on disk, and how often records are
/// trimmed: often enough against [`UNUSED`], rarely enough to cost nothing per resolution.
pub(super) const RENEW: Duration = Duration::from_secs(3600);

/// What this kas last did with each record on disk, and when it last trimmed them.
#[derive(Debug, Default)]
pub(super) struct Recorded {
    /// Each record, by file name, with when it was last written or its use renewed.
    kept: HashMap<String, (Record, Instant)>,
    trimmed: Option<Instant>,
}

/// What a record's file needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Disk {
    Write,
    Renew,
    Nothing,
}

impl Recorded {
    /// What the file `name` needs at `now` for `record` to be there, its use renewed; noted
    /// as done.
    fn due(&mut self, name: &str, record: &Record, now: Instant) -> Disk {
        let disk = match self.kept.get(name) {
            Some((r, at)) if r == record && now.duration_since(*at) < RENEW => Disk::Nothing,
            Some((r, _)) if r == record => Disk::Renew,
            _ => Disk::Write,
        };
        if disk != Disk::Nothing {
            self.kept.insert(name.to_owned(), (record.clone(), now));
        }
        disk
    }

    /// Whether records are due to be trimmed at `now`; noted as done.
    fn trim_due(&mut self, now: Instant) -> bool {
        let due = self.trimmed.is_none_or(|t| now.duration_since(t) >= RENEW);
        if due {
            self.trimmed = Some(now);
        }
        due
    }
}

impl ChartFetcher {
    /// Keeps on disk what `chart` resolved to (of the registry manifest `manifest`) in an
    /// index fetched at `fetched_at` (unless that is what was last kept: then its use is
    /// renewed), and trims unused records.
    pub(super) async fn record(
        &self,
        chart: &Dependency,
        resolved: &Resolved,
        manifest: Option<String>,
        fetched_at: SystemTime,
    ) {
        let record = Record::new(chart, resolved, manifest, fetched_at);
        self.keep_record(resolutions::file_name(chart), record)
            .await;
    }

    /// The resolution of `chart` kept on disk, if any; its use renewed.
    pub(super) async fn recorded(&self, chart: &Dependency) -> Option<Record> {
        let name = resolutions::file_name(chart);
        let path = self.config.cache_dir.as_ref()?.join(&name);
        let bytes = tokio::task::spawn_blocking(move || std::fs::read(path))
            .await
            .ok()?
            .ok()?;
        let record = Record::decode(&bytes, chart)?;
        self.keep_record(name, record.clone()).await;
        Some(record)
    }

    /// Writes `record` as the file `name`, or renews its use, as due; trims when due.
    async fn keep_record(&self, name: String, record: Record) {
        let Some(dir) = self.config.cache_dir.clone() else {
            return;
        };
        let (disk, trim) = {
            let mut recorded = self.recorded.lock().unwrap_or_else(PoisonError::into_inner);
            let now = Instant::now();
            (recorded.due(&name, &record, now), recorded.trim_due(now))
        };
        if disk == Disk::Nothing && !trim {
            return;
        }
        let done = tokio::task::spawn_blocking(move || {
            match disk {
                Disk::Write => write_file(&dir, &name, &record.encode())?,
                Disk::Renew => renew(&dir.join(&name))?,
                Disk::Nothing => {}
            }
            if trim {
                trim_records(&dir, UNUSED, SystemTime::now())?;
            }
            Ok::<_, std::io::Error>(())
        })
        .await;
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "Cannot keep a chart's resolution on disk"),
            Err(e) => tracing::warn!(error = %e, "Cannot keep a chart's resolution on disk"),
        }
    }
}

/// Sets `path`'s time to now: its last use.
fn renew(path: &Path) -> std::io::Result<()> {
    std::fs::File::options()
        .write(true)
        .open(path)?
        .set_modified(SystemTime::now())
}

/// Deletes the records of `dir` (`*.resolved.json`) last used more than `unused` before `now`;
/// how many.
fn trim_records(dir: &Path, unused: Duration, now: SystemTime) -> std::io::Result<usize> {
    let Some(oldest) = now.checked_sub(unused) else {
        return Ok(0);
    };
    let mut deleted = 0;
    for entry in std::fs::read_dir(dir)?.flatten() {
        let path = entry.path();
        let is_record = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(".resolved.json"));
        let Ok(meta) = entry.metadata() else { continue };
        let used = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
        if is_record && meta.is_file() && used < oldest {
            std::fs::remove_file(&path)?;
            deleted += 1;
        }
    }
    if deleted > 0 {
        tracing::info!(dir = %dir.display(), deleted, "Deleted chart resolutions no chart used for 30 days");
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn aged(path: &Path, age: Duration) {
        let f = std::fs::File::options().write(true).open(path).unwrap();
        f.set_modified(SystemTime::now() - age).unwrap();
    }

    #[test]
    fn records_unused_for_the_bound_are_deleted_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let day = Duration::from_secs(24 * 3600);
        for (name, age) in [
            ("old.resolved.json", 31 * day),
            ("recent.resolved.json", 29 * day),
            ("renewed.resolved.json", 40 * day),
            (&format!("{}.tgz", "a".repeat(64)), 40 * day),
        ] {
            std::fs::write(d.join(name), b"{}").unwrap();
            aged(&d.join(name), age);
        }
        renew(&d.join("renewed.resolved.json")).unwrap();
        assert_eq!(trim_records(d, UNUSED, SystemTime::now()).unwrap(), 1);
        let mut left: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        let archive = format!("{}.tgz", "a".repeat(64));
        assert_eq!(
            left,
            [
                archive.as_str(),
                "recent.resolved.json",
                "renewed.resolved.json"
            ]
        );
    }

    fn record(version: &str) -> Record {
        let chart = Dependency {
            name: "greeter".into(),
            version: "~1.0".into(),
            repository: "https://charts.example.com".into(),
        };
        let resolved = Resolved {
            name: "greeter".into(),
            version: version.into(),
            url: "https://charts.example.com/greeter.tgz".into(),
            digest: "ab".repeat(32),
        };
        Record::new(&chart, &resolved, None, SystemTime::UNIX_EPOCH)
    }

    #[test]
    fn a_record_is_written_when_new_or_changed_and_its_use_renewed_hourly() {
        let mut recorded = Recorded::default();
        let now = Instant::now();
        assert_eq!(recorded.due("r", &record("1.0.0"), now), Disk::Write);
        assert_eq!(recorded.due("r", &record("1.0.0"), now), Disk::Nothing);
        assert_eq!(recorded.due("r", &record("1.0.1"), now), Disk::Write);
        let later = now + RENEW - Duration::from_secs(1);
        assert_eq!(recorded.due("r", &record("1.0.1"), later), Disk::Nothing);
        let hour = now + RENEW;
        assert_eq!(recorded.due("r", &record("1.0.1"), hour), Disk::Renew);
        assert_eq!(recorded.due("r", &record("1.0.1"), hour), Disk::Nothing);
        assert!(recorded.trim_due(now));
        assert!(!recorded.trim_due(later), "at most hourly");
        assert!(recorded.trim_due(hour));
    }
}
