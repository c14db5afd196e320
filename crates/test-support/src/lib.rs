//! Fixtures the crates' tests share, so each exists once: loopback listeners and ports, a
//! throwaway certificate authority, Git work trees driven with the `git` CLI and a `git daemon`.
//!
//! Only ever a dev-dependency. Helpers fail the test (panic) instead of returning errors, since a
//! broken fixture is a broken test.

pub mod git;
pub mod net;
pub mod pki;

pub use git::{GitDaemon, GitRepo, git};
pub use net::{listener, tokio_listener, unused_port};
pub use pki::Pki;
