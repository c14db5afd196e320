//! A consistent copy of a SQLite database while kas runs on it (`kas store backup`).
//!
//! SQLite's online backup API copies the database a bounded number of pages at a time and holds
//! the read lock only during each step. With kas's rollback journal a commit has to wait for
//! every reader, so a copy in one read transaction (`VACUUM INTO`) stalled kas's writes for the
//! whole copy, and past kas's 5 s busy timeout failed them; between steps they go through, so a
//! write waits at most one step, however large the database.
//!
//! A commit by another process between steps makes the next step start the copy over, so what
//! is finally written is the database as of one moment. A database committed to more often than
//! one pass takes would never be copied that way, so each restart doubles the step: at worst
//! the copy ends in one step, holding the lock as long as a one-transaction copy did.

use std::path::Path;
use std::time::Duration;

use rusqlite::backup::{Backup, StepResult};
use rusqlite::{Connection, OpenFlags};

use crate::error::Result;

/// How long a step waits for a writer holding the database to finish (a writer about to
/// commit keeps new readers out). Longer than kas's own: the copy is what the operator asked for.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// Pages a step copies until a commit restarts the copy: 4 MiB at SQLite's default page size,
/// read in milliseconds, which is then the longest a commit by kas waits for the copy.
pub const PAGES_PER_STEP: u32 = 1024;

/// Where a copy stands after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Pages the current pass still has to copy.
    pub remaining: u32,
    /// The database's size in pages.
    pub pages: u32,
    /// How many times a commit made the copy start over so far.
    pub restarts: u32,
}

/// Why a copy failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// SQLite failed to open, read or write a database.
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    /// A writer kept the database locked past the busy timeout.
    #[error("the database stayed locked by a writer for more than {0:?}")]
    Locked(Duration),
    /// The thread doing the copy ended without finishing it.
    #[error("the copy stopped: {0}")]
    Interrupted(#[from] tokio::task::JoinError),
}

/// Writes a consistent copy of the SQLite database at `source` to `target`, which must not exist
/// or be empty, [`PAGES_PER_STEP`] pages at a time. The source is opened read-only and never
/// migrated or created: a backup must not change the database it copies, and a newer CLI must
/// not migrate a database an older kas is running on.
pub async fn sqlite_snapshot(source: &Path, target: &Path) -> Result<()> {
    sqlite_snapshot_in_steps(source, target, PAGES_PER_STEP, |_| ()).await
}

/// [`sqlite_snapshot`] starting with `pages_per_step`; `between_steps` is called after each step
/// that left pages to copy, while the copy holds no lock on the source.
pub async fn sqlite_snapshot_in_steps(
    source: &Path,
    target: &Path,
    pages_per_step: u32,
    between_steps: impl FnMut(Progress) + Send + 'static,
) -> Result<()> {
    let (source, target) = (source.to_owned(), target.to_owned());
    // SQLite's calls block (a step may wait out the busy timeout), so not on a runtime thread.
    let copied = tokio::task::spawn_blocking(move || {
        copy_in_steps(&source, &target, pages_per_step, between_steps)
    })
    .await
    .map_err(BackupError::from)?;
    Ok(copied?)
}

fn copy_in_steps(
    source: &Path,
    target: &Path,
    pages_per_step: u32,
    mut between_steps: impl FnMut(Progress),
) -> Result<(), BackupError> {
    // No URI flag: a file name is taken as it is, whatever it starts with.
    let from = Connection::open_with_flags(
        source,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    from.busy_timeout(BUSY_TIMEOUT)?;
    let mut to = Connection::open_with_flags(
        target,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    {
        let backup = Backup::new(&from, &mut to)?;
        let mut pacing = Pacing::new(pages_per_step);
        loop {
            match backup.step(pacing.pages())? {
                StepResult::Done => break,
                StepResult::More => {
                    let now = backup.progress();
                    between_steps(pacing.after_step(now.remaining, now.pagecount));
                }
                // The source's busy handler has already waited BUSY_TIMEOUT for the lock.
                _ => return Err(BackupError::Locked(BUSY_TIMEOUT)),
            }
        }
    }
    to.close().map_err(|(_, e)| e)?;
    from.close().map_err(|(_, e)| e)?;
    Ok(())
}

/// The most pages SQLite takes for one step.
const MAX_STEP: u32 = i32::MAX as u32;

/// How many pages the next step copies, and how many times the copy restarted.
#[derive(Debug)]
struct Pacing {
    pages: u32,
    last_remaining: Option<u32>,
    restarts: u32,
}

impl Pacing {
    fn new(pages: u32) -> Self {
        Self {
            pages: pages.clamp(1, MAX_STEP),
            last_remaining: None,
            restarts: 0,
        }
    }

    fn pages(&self) -> i32 {
        i32::try_from(self.pages).unwrap_or(i32::MAX)
    }

    /// Takes SQLite's count after a step that left pages to copy. A step copies exactly the
    /// pages asked for, so a pass that is not that much nearer its end was started over.
    fn after_step(&mut self, remaining: i32, pagecount: i32) -> Progress {
        let remaining = u32::try_from(remaining).unwrap_or(0);
        let step = u64::from(self.pages);
        if self
            .last_remaining
            .is_some_and(|last| u64::from(remaining) + step > u64::from(last))
        {
            self.restarts += 1;
            self.pages = self.pages.saturating_mul(2).min(MAX_STEP);
        }
        self.last_remaining = Some(remaining);
        Progress {
            remaining,
            pages: u32::try_from(pagecount).unwrap_or(0),
            restarts: self.restarts,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pass_moving_towards_its_end_keeps_the_step() {
        let mut pacing = Pacing::new(10);
        assert_eq!(pacing.after_step(90, 100).restarts, 0);
        assert_eq!(pacing.after_step(80, 100).restarts, 0);
        assert_eq!(pacing.pages(), 10);
    }

    #[test]
    fn each_restart_doubles_the_step() {
        let mut pacing = Pacing::new(10);
        pacing.after_step(90, 100);
        pacing.after_step(80, 100);
        // Started over: the pass begins again from the first page.
        assert_eq!(pacing.after_step(90, 100).restarts, 1);
        assert_eq!(pacing.pages(), 20);
        // Started over right after a restart: nearer the end, but by less than a step.
        assert_eq!(pacing.after_step(80, 100).restarts, 2);
        assert_eq!(pacing.pages(), 40);
        assert_eq!(pacing.after_step(40, 100).restarts, 2);
    }

    #[test]
    fn the_step_never_overflows_sqlites_count() {
        let mut pacing = Pacing::new(u32::MAX);
        assert_eq!(pacing.pages(), i32::MAX);
        pacing.after_step(5, 10);
        pacing.after_step(5, 10);
        assert_eq!(pacing.pages(), i32::MAX);
        assert_eq!(Pacing::new(0).pages(), 1);
    }
}
