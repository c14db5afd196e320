//! The renderer's network confinement that needs no namespace: kas re-executes itself as
//! `kas render-confine -- <renderer> <args>`, which installs a seccomp filter refusing
//! Internet, packet and netlink sockets and then executes the renderer, which inherits it.
//!
//! A network namespace needs `unshare` to be allowed, which a container with the runtime's
//! default seccomp profile and no capabilities (kas's Helm chart) is not; a seccomp filter
//! only needs `no_new_privs`, which any process may set. The filter also outlives every
//! `exec`, so neither the renderer nor anything it starts can lift it.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::unix::process::CommandExt;

use nix::libc;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// kas's hidden subcommand that confines and executes a renderer.
pub const SUBCOMMAND: &str = "render-confine";

/// The argument that makes the subcommand test the filter on itself instead (the startup
/// probe): it prints [`SELF_TEST_PASSED`] when an Internet socket is refused under it.
pub const SELF_TEST: &str = "--self-test";

/// What a passed self-test prints: a program that merely exits 0 is no confinement.
pub const SELF_TEST_PASSED: &str = "internet sockets refused";

/// Address families a renderer may not open sockets of. `AF_UNIX` stays allowed: it reaches
/// nothing outside the pod but what the filesystem exposes, and Go's runtime may use it.
const REFUSED_FAMILIES: [i32; 4] = [
    libc::AF_INET,
    libc::AF_INET6,
    libc::AF_PACKET,
    libc::AF_NETLINK,
];

/// Why confinement failed.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    /// The command line is not `render-confine -- <program> [args]` or `render-confine
    /// --self-test`.
    #[error("usage: kas {SUBCOMMAND} -- <program> [args…] | kas {SUBCOMMAND} {SELF_TEST}")]
    Usage,
    /// The filter could not be built or installed (no seccomp in this kernel or container).
    #[error("installing the seccomp filter: {0}")]
    Seccomp(String),
    /// The renderer could not be executed.
    #[error("executing {program}: {error}")]
    Exec {
        /// The program.
        program: String,
        /// Why.
        error: std::io::Error,
    },
    /// The self-test opened an Internet socket under the filter.
    #[error("the seccomp filter is installed but an Internet socket was not refused")]
    NotRefused,
}

/// The filter: `socket()` of a refused family fails with `EACCES` (which Go reports as
/// "socket: permission denied"), and so does `io_uring_setup`, as io_uring can open sockets
/// without `socket()`; everything else is allowed.
pub fn filter() -> Result<BpfProgram, ConfineError> {
    let seccomp = |e: seccompiler::BackendError| ConfineError::Seccomp(e.to_string());
    let rules = REFUSED_FAMILIES
        .iter()
        .map(|family| {
            let domain = u64::try_from(*family).unwrap_or_default();
            let on = SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, domain)?;
            SeccompRule::new(vec![on])
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(seccomp)?;
    // No rules: refused whatever its arguments.
    let by_call = BTreeMap::from([
        (libc::SYS_socket, rules),
        (libc::SYS_io_uring_setup, Vec::new()),
    ]);
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(seccomp)?;
    let filter = SeccompFilter::new(
        by_call,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES as u32),
        arch,
    )
    .map_err(seccomp)?;
    filter.try_into().map_err(seccomp)
}

/// Installs the filter on the calling thread (and so on what it executes). Sets
/// `no_new_privs` first, which the kernel requires of an unprivileged process.
pub fn install() -> Result<(), ConfineError> {
    seccompiler::apply_filter(&filter()?).map_err(|e| ConfineError::Seccomp(e.to_string()))
}

/// Runs the subcommand with its arguments (after `render-confine`): only returns on failure.
pub fn run(args: &[OsString]) -> ConfineError {
    match args {
        [flag] if flag == SELF_TEST => match install() {
            Err(e) => e,
            Ok(()) => match std::net::UdpSocket::bind("127.0.0.1:0") {
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                    println!("{SELF_TEST_PASSED}");
                    std::process::exit(0)
                }
                _ => ConfineError::NotRefused,
            },
        },
        [dashes, program, rest @ ..] if dashes == "--" => {
            if let Err(e) = install() {
                return e;
            }
            let error = std::process::Command::new(program).args(rest).exec();
            ConfineError::Exec {
                program: program.to_string_lossy().into_owned(),
                error,
            }
        }
        _ => ConfineError::Usage,
    }
}

/// For a binary's `main`, first thing (before threads or a runtime start): when the process
/// was started as `<binary> render-confine …`, confines and executes the renderer, or says
/// why it cannot and exits 126 (as a shell does for a program it cannot execute). Otherwise
/// returns.
pub fn dispatch() {
    let mut args = std::env::args_os().skip(1);
    if args.next().is_some_and(|a| a == SUBCOMMAND) {
        let rest: Vec<OsString> = args.collect();
        let e = run(&rest);
        eprintln!("{SUBCOMMAND}: {e}");
        std::process::exit(126);
    }
}

#[cfg(test)]
mod tests {
    use std::io::ErrorKind;

    use super::*;

    /// On a thread of its own: the filter applies to the thread that installs it only.
    fn under_filter<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(move || {
            install().expect("seccomp filter installed");
            f()
        })
        .join()
        .expect("thread")
    }

    #[test]
    fn the_filter_refuses_internet_sockets_and_keeps_unix_ones() {
        let (v4, v6, tcp, unix) = under_filter(|| {
            let v4 = std::net::UdpSocket::bind("127.0.0.1:0").map_err(|e| e.kind());
            let v6 = std::net::UdpSocket::bind("[::1]:0").map_err(|e| e.kind());
            let tcp = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.kind());
            let unix = std::os::unix::net::UnixDatagram::unbound().map_err(|e| e.kind());
            (v4.is_ok(), v6.err(), tcp.err(), unix.is_ok())
        });
        assert!(!v4, "an IPv4 socket was opened under the filter");
        assert_eq!(v6, Some(ErrorKind::PermissionDenied));
        assert_eq!(tcp, Some(ErrorKind::PermissionDenied));
        assert!(unix, "Unix sockets stay allowed");
        // This thread has no filter: the test machine itself can open sockets.
        assert!(std::net::UdpSocket::bind("127.0.0.1:0").is_ok());
    }

    #[test]
    fn only_the_two_command_lines_are_understood() {
        assert!(matches!(run(&[]), ConfineError::Usage));
        assert!(matches!(
            run(&["kustomize".into(), "build".into()]),
            ConfineError::Usage
        ));
    }
}
