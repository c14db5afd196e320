//! The renderer's confinement that needs no namespace: kas re-executes itself as `kas
//! render-confine [--read PATH | --write PATH]… -- <renderer> <args>`, which fences the
//! renderer's files with Landlock (see [`super::filesystem`]), installs a seccomp filter
//! refusing Internet, packet and netlink sockets and then executes the renderer, which
//! inherits both.
//!
//! A network namespace needs `unshare` to be allowed, which a container with the runtime's
//! default seccomp profile and no capabilities (kas's Helm chart) is not; a seccomp filter
//! only needs `no_new_privs`, which any process may set. The filter also outlives every
//! `exec`, so neither the renderer nor anything it starts can lift it.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use nix::libc;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch, sock_filter,
};

use super::filesystem::{self, Enforced, Fence};

/// kas's hidden subcommand that confines and executes a renderer.
pub const SUBCOMMAND: &str = "render-confine";

/// The argument that makes the subcommand test the filter on itself instead (the startup
/// probe): it prints [`SELF_TEST_PASSED`] when an Internet socket is refused under it.
pub const SELF_TEST: &str = "--self-test";

/// What a passed self-test prints first: a program that merely exits 0 is no confinement.
pub const SELF_TEST_PASSED: &str = "internet sockets refused";

/// What a passed self-test prints next when Landlock fences the renderer's files here.
pub const SELF_TEST_LANDLOCK: &str = "files fenced";

/// Flags before `--`: a file or folder the renderer may read, or read and write.
const READ: &str = "--read";
const WRITE: &str = "--write";

/// Address families a renderer may not open sockets of. `AF_UNIX` stays allowed: it reaches
/// nothing outside the pod but what the filesystem exposes, and Go's runtime may use it.
const REFUSED_FAMILIES: [i32; 4] = [
    libc::AF_INET,
    libc::AF_INET6,
    libc::AF_PACKET,
    libc::AF_NETLINK,
];

/// `__X32_SYSCALL_BIT`: on x86_64, a system call number with this bit set is the x32 ABI's
/// name for the same kernel handler (x32 `socket` is `0x40000000 | 41`), and the architecture
/// the filter checks is x86_64 for both. Nothing kas renders with uses x32, and other
/// architectures have no numbers this high, so every such call is refused.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// Classic BPF opcodes (`linux/bpf_common.h`), which seccompiler does not export: load the
/// 32-bit word at an offset of `seccomp_data` (`BPF_LD | BPF_W | BPF_ABS`, the first two
/// being 0), jump if the accumulator is >= a constant (`BPF_JMP | BPF_JGE | BPF_K`), return a
/// constant (`BPF_RET | BPF_K`).
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JMP_JGE_K: u16 = 0x05 | 0x30;
const BPF_RET_K: u16 = 0x06;

/// Why confinement failed.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    /// The command line is not `render-confine [--read PATH | --write PATH]… -- <program>
    /// [args]` or `render-confine --self-test`.
    #[error(
        "usage: kas {SUBCOMMAND} [{READ} PATH | {WRITE} PATH]… -- <program> [args…] | kas {SUBCOMMAND} {SELF_TEST}"
    )]
    Usage,
    /// Landlock is in the kernel but the fence could not be put up.
    #[error("fencing the renderer's files with Landlock: {0}")]
    Landlock(String),
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
/// without `socket()`, and every x32 system call (see [`X32_SYSCALL_BIT`]); everything else
/// is allowed.
pub fn filter() -> Result<BpfProgram, ConfineError> {
    let refused = SeccompAction::Errno(libc::EACCES as u32);
    // seccompiler compares syscall numbers for equality only, so an x32 number never matches
    // a rule and gets the default action (allow). Refuse those first, ahead of seccompiler's
    // program: its jumps are relative, so nothing in it moves.
    let mut program = refuse_x32(u32::from(refused.clone())).to_vec();
    program.extend(by_syscall(refused)?);
    Ok(program)
}

/// Returns `refused` for every system call numbered from [`X32_SYSCALL_BIT`] up, and goes on
/// to the next instruction for the others.
fn refuse_x32(refused: u32) -> [sock_filter; 3] {
    // `seccomp_data.nr` is the first field.
    let nr_offset = 0;
    [
        sock_filter {
            code: BPF_LD_W_ABS,
            jt: 0,
            jf: 0,
            k: nr_offset,
        },
        sock_filter {
            code: BPF_JMP_JGE_K,
            jt: 0,
            jf: 1,
            k: X32_SYSCALL_BIT,
        },
        sock_filter {
            code: BPF_RET_K,
            jt: 0,
            jf: 0,
            k: refused,
        },
    ]
}

/// seccompiler's program: refused families of `socket()`, and `io_uring_setup`.
fn by_syscall(refused: SeccompAction) -> Result<BpfProgram, ConfineError> {
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
    let filter =
        SeccompFilter::new(by_call, SeccompAction::Allow, refused, arch).map_err(seccomp)?;
    filter.try_into().map_err(seccomp)
}

/// Installs the filter on the calling thread (and so on what it executes). Sets
/// `no_new_privs` first, which the kernel requires of an unprivileged process.
pub fn install() -> Result<(), ConfineError> {
    seccompiler::apply_filter(&filter()?).map_err(|e| ConfineError::Seccomp(e.to_string()))
}

/// A renderer's command line to the subcommand, parsed.
#[derive(Debug, PartialEq, Eq)]
struct Invocation<'a> {
    read: Vec<PathBuf>,
    write: Vec<PathBuf>,
    program: &'a OsString,
    args: &'a [OsString],
}

/// `[--read PATH | --write PATH]… -- program args…`; `None` for anything else.
fn parse(mut rest: &[OsString]) -> Option<Invocation<'_>> {
    let (mut read, mut write) = (Vec::new(), Vec::new());
    loop {
        rest = match rest {
            [flag, path, more @ ..] if flag == READ => {
                read.push(PathBuf::from(path));
                more
            }
            [flag, path, more @ ..] if flag == WRITE => {
                write.push(PathBuf::from(path));
                more
            }
            [dashes, program, args @ ..] if dashes == "--" => {
                return Some(Invocation {
                    read,
                    write,
                    program,
                    args,
                });
            }
            _ => return None,
        };
    }
}

/// Runs the subcommand with its arguments (after `render-confine`): only returns on failure.
pub fn run(args: &[OsString]) -> ConfineError {
    if let [flag] = args
        && flag == SELF_TEST
    {
        return self_test();
    }
    let Some(call) = parse(args) else {
        return ConfineError::Usage;
    };
    let program = Path::new(call.program);
    // A renderer installed as a link (`/usr/local/bin/helm` to `/opt/helm/helm`) is executed
    // through both paths.
    let resolved = std::fs::canonicalize(program).ok();
    let fence = filesystem::fence(program, resolved.as_deref(), &call.read, &call.write);
    if let Err(e) = filesystem::restrict(&fence) {
        return ConfineError::Landlock(e.to_string());
    }
    if let Err(e) = install() {
        return e;
    }
    let error = std::process::Command::new(program).args(call.args).exec();
    ConfineError::Exec {
        program: program.to_string_lossy().into_owned(),
        error,
    }
}

/// The startup probe: the filter refuses an Internet socket, and whether Landlock fences
/// files here (a fence of nothing: the test reads no file).
fn self_test() -> ConfineError {
    let fenced = match filesystem::restrict(&Fence {
        read: Vec::new(),
        write: Vec::new(),
    }) {
        Ok(enforced) => enforced != Enforced::No,
        Err(e) => return ConfineError::Landlock(e.to_string()),
    };
    if let Err(e) = install() {
        return e;
    }
    match std::net::UdpSocket::bind("127.0.0.1:0") {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            println!("{SELF_TEST_PASSED}");
            if fenced {
                println!("{SELF_TEST_LANDLOCK}");
            }
            std::process::exit(0)
        }
        _ => ConfineError::NotRefused,
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

    /// What `program` returns for a system call of `arch`, by classic BPF's rules for the
    /// instructions seccompiler and [`refuse_x32`] emit: the filter's decisions without a
    /// kernel, for calls this machine cannot make (its kernel may lack x32).
    fn decide(program: &[sock_filter], arch: u32, nr: u32, args: [u64; 6]) -> u32 {
        // struct seccomp_data { int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6]; }
        let mut data = Vec::with_capacity(64);
        data.extend(nr.to_ne_bytes());
        data.extend(arch.to_ne_bytes());
        data.extend(0u64.to_ne_bytes());
        args.iter().for_each(|a| data.extend(a.to_ne_bytes()));
        let word = |offset: u32| {
            let at = offset as usize;
            u32::from_ne_bytes(data[at..at + 4].try_into().expect("4 bytes"))
        };
        let (mut acc, mut pc) = (0u32, 0usize);
        loop {
            let i = &program[pc];
            pc += 1;
            let jump = |taken: bool| usize::from(if taken { i.jt } else { i.jf });
            match i.code {
                0x20 => acc = word(i.k),
                0x54 => acc &= i.k,
                0x05 => pc += i.k as usize,
                0x15 => pc += jump(acc == i.k),
                0x25 => pc += jump(acc > i.k),
                0x35 => pc += jump(acc >= i.k),
                0x06 => return i.k,
                code => panic!("instruction {code:#x} not interpreted"),
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_filter_refuses_x32_system_calls_which_reach_the_same_handlers() {
        const AUDIT_ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;
        let program = filter().expect("filter");
        let call = |nr: i64, family: i32| {
            let nr = u32::try_from(nr).expect("syscall number");
            let family = u64::try_from(family).expect("family");
            decide(&program, AUDIT_ARCH_X86_64, nr, [family, 2, 0, 0, 0, 0])
        };
        let refused = libc::SECCOMP_RET_ERRNO | libc::EACCES as u32;
        let allowed = libc::SECCOMP_RET_ALLOW;
        let x32 = i64::from(X32_SYSCALL_BIT);
        assert_eq!(call(x32 | libc::SYS_socket, libc::AF_INET), refused);
        assert_eq!(call(x32 | libc::SYS_socket, libc::AF_UNIX), refused);
        assert_eq!(call(x32 | libc::SYS_read, 0), refused);
        // The x86_64 numbers are decided as before.
        assert_eq!(call(libc::SYS_socket, libc::AF_INET), refused);
        assert_eq!(call(libc::SYS_socket, libc::AF_UNIX), allowed);
        assert_eq!(call(libc::SYS_read, 0), allowed);
    }

    #[test]
    fn only_the_two_command_lines_are_understood() {
        assert!(matches!(run(&[]), ConfineError::Usage));
        assert!(matches!(
            run(&["kustomize".into(), "build".into()]),
            ConfineError::Usage
        ));
        assert!(matches!(
            run(&["--read".into(), "--".into(), "kustomize".into()]),
            ConfineError::Usage
        ));
    }

    #[test]
    fn the_paths_before_the_dashes_are_what_the_renderer_may_reach() {
        let args: Vec<OsString> = ["--read", "/c/repo", "--write", "/c/s", "--", "helm", "x"]
            .into_iter()
            .map(OsString::from)
            .collect();
        let call = parse(&args).expect("parsed");
        assert_eq!(call.read, [PathBuf::from("/c/repo")]);
        assert_eq!(call.write, [PathBuf::from("/c/s")]);
        assert_eq!(call.program, "helm");
        assert_eq!(call.args, [OsString::from("x")]);
        let bare: Vec<OsString> = ["--", "helm"].into_iter().map(OsString::from).collect();
        assert_eq!(parse(&bare).expect("parsed").read, Vec::<PathBuf>::new());
    }
}
