//! Small filesystems for tests of full and read-only disks: a real tmpfs mounted on a fresh
//! temporary directory (needs root, as the test suite runs here and in CI).

use std::fs::File;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs mounted on a fresh temporary directory; unmounted when dropped, also when a test
/// panics with files on it still open (hence the lazy unmount).
#[derive(Debug)]
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size_kib` KiB. Panics with a clear message when that is not possible
    /// (not root): a test that needs it must fail, not pass without testing anything.
    pub fn mount(size_kib: u32) -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        run_mount(&[
            "-t",
            "tmpfs",
            "-o",
            &format!("size={size_kib}k,mode=0700"),
            "tether-test",
            &dir.path().to_string_lossy(),
        ]);
        Self { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Remounts with `options` ("ro" or "rw").
    pub fn remount(&self, options: &str) {
        run_mount(&[
            "-o",
            &format!("remount,{options}"),
            &self.path().to_string_lossy(),
        ]);
    }

    /// Fills every free byte with a file and returns its path; deleting it frees the space.
    pub fn fill(&self) -> PathBuf {
        let path = self.path().join("filler");
        let mut file = File::create(&path).expect("creating the filler file");
        let chunk = vec![0xa5_u8; 64 * 1024];
        loop {
            match file.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::StorageFull => break,
                Err(e) => panic!("filling the tmpfs: {e}"),
            }
        }
        // Prove it is full rather than trusting the loop: one more byte must not fit.
        let err = file
            .write_all(&[0])
            .expect_err("the tmpfs still had room after filling");
        assert_eq!(err.kind(), ErrorKind::StorageFull, "{err}");
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let status = Command::new("umount").arg("-l").arg(self.path()).status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!("could not unmount {}: {status:?}", self.path().display());
        }
    }
}

fn run_mount(args: &[&str]) {
    let out = Command::new("mount")
        .args(args)
        .output()
        .expect("running mount(8)");
    assert!(
        out.status.success(),
        "mount {args:?} failed ({}): {}. Tests of full and read-only disks need root to mount a tmpfs.",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
}
