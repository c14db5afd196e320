//! Bare Git mirrors of the projects kas needs, fetched on a poll interval or a push webhook,
//! and reads of files at a commit straight from the object database.
//!
//! - [`Remote`]: where a repository is (`https://`, `http://`, `git://`, `ssh://` or scp-like
//!   `user@host:path`, `file://`, or a local path) and optional [`Credentials`] or [`SshAuth`]
//!   (deploy key and pinned host keys).
//! - [`Mirror`]: one bare repository per project in a cache directory; [`Mirror::fetch`]
//!   (blocking, or interrupted from another thread with a [`FetchInterrupt`]) or
//!   [`Mirror::fetch_async_within`] (a deadline), then [`Mirror::resolve`], [`Mirror::read_file`] and
//!   [`Mirror::list_files`] at a [`CommitId`].
//! - [`Sources`]: the set of mirrors kas keeps fresh (poll interval, webhook triggers,
//!   backoff on failure), publishing each project's default-branch commit.
//! - [`VerifyPolicy`]: signed commits only; [`Mirror::verify_commit`] checks a commit with
//!   `git verify-commit` (and `gpg`) in an isolated environment, and [`Sources`] never publishes
//!   a commit that fails ([`ProjectHead::refusal`] says why).
//! - [`webhook`]: verification of GitLab, GitHub and Gitea push webhooks, as pure functions.
//!
//! gix (gitoxide) does all Git work but one: mirrors are repacked with the `git` CLI once
//! fetches have piled up packs, so it must be installed. Local remotes are fetched from a
//! `git upload-pack` kas spawns itself (gix's file transport drops its stderr, which says why a
//! fetch of a broken repository failed); SSH remotes through gix's SSH transport, which runs the
//! `ssh` program (OpenSSH) through `/bin/sh`, its stderr (the remote upload-pack's) sent to a
//! file for the same reason. Signed commits need
//! `ssh-keygen` (SSH signatures) or `gpg` and `gpgconf` (OpenPGP). [`Sources`] warns when a
//! project it is given needs one of them and `PATH` lacks it ([`needed_tools`]).

mod activity;
mod daemon;
mod error;
mod interrupt;
mod maintenance;
mod metrics;
mod mirror;
mod remote;
mod sources;
mod ssh;
mod tools;
mod upload_pack;
mod verify;
pub mod webhook;

pub use activity::{CAP_FACTOR, GaveUp};
pub use error::{Error, FetchError};
pub use interrupt::FetchInterrupt;
pub use maintenance::{MaintenanceError, MaintenanceStatus, RepackReport};
pub use metrics::{Delivery, FetchMetrics};
pub use mirror::{CommitId, FetchOutcome, FileEntry, GitRef, Mirror, RefChange};
pub use remote::{Credentials, Remote, RemoteError, RemoteKind, SshAuth};
pub use sources::{ProjectHead, ProjectSpec, Sources};
pub use tools::{Tool, missing_tools, needed_tools};
pub use verify::{Refusal, Verified, VerifyPolicy};
pub use webhook::{PushEvent, WebhookError, WebhookKind, verify_webhook};
