//! kas, the agent server.
//!
//! `kas [--configuration-file kas.yaml]` serves; the other subcommands are admin commands that
//! talk to a running kas through its internal API (address and admin token from the same
//! configuration file). The commands live in `cli`.

mod cli;

use anyhow::{Context, Result};
use clap::Parser;
use kas::config::Config;

use cli::agent::{agent_cmd, diff_exit};
use cli::args::{Cli, Cmd, ConfigCmd};
use cli::local::{store_cmd, validate_agent_config};
use cli::output::{Reported, is_stdout_closed};
use cli::project::project_cmd;
use cli::reconcile::Unsuccessful;
use cli::tokens::{ci_kubeconfig, token_cmd, user_token_cmd};
use cli::{admin_client, load_config};

fn main() -> std::process::ExitCode {
    // `kas render-confine -- <renderer>`, how kas starts its renderers: before any thread or
    // runtime, so the seccomp filter is all the renderer inherits.
    tether_gitops_server::render::confine::dispatch();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kas: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(run_kas());
    // Everything that matters has stopped by now (the modules, the store last). What may be
    // left is a blocking thread stuck in a read nothing can interrupt — a Git fetch over HTTP
    // or SSH from a host that went silent — which dropping the runtime would wait for, holding
    // the exit up to that read's own timeout (30 s, a minute) past the shutdown.
    runtime.shutdown_timeout(BLOCKED_THREADS_GRACE);
    code
}

/// How long kas's exit waits for blocking threads still running after its shutdown.
const BLOCKED_THREADS_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

async fn run_kas() -> std::process::ExitCode {
    let cli = Cli::parse();
    // `kas agent diff` exits 1 for "changes", so its errors need another code.
    let failure = match &cli.cmd {
        Some(Cmd::Agent(cli::args::AgentCmd::Diff(_))) => kas::diff::EXIT_ERROR,
        _ => 1,
    };
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => match ending(&e, failure) {
            Ending::Quiet(code) => std::process::ExitCode::from(code),
            Ending::Said(code) => {
                eprintln!("kas: {e:#}");
                std::process::ExitCode::from(code)
            }
        },
    }
}

/// How a command that failed ends: its exit code, and whether its error is still to be said.
#[derive(Debug, PartialEq, Eq)]
enum Ending {
    /// Nothing more to say: the output said it already, or nobody reads it.
    Quiet(u8),
    /// Print the error, then exit with the code.
    Said(u8),
}

/// `failure` is the command's code for an error.
fn ending(e: &anyhow::Error, failure: u8) -> Ending {
    // Only our own standard output cut short (`kas … | head`) is no failure; a broken pipe to
    // kas, a tunnel or a client of `serve` is one.
    if is_stdout_closed(e) {
        return Ending::Quiet(0);
    }
    // Their progress already said why; the code tells scripts which way it went.
    if let Some(u) = e.downcast_ref::<Unsuccessful>() {
        return Ending::Quiet(u.outcome.code());
    }
    if let Some(r) = e.downcast_ref::<Reported>() {
        return Ending::Quiet(r.code);
    }
    Ending::Said(failure)
}

async fn run(cli: Cli) -> Result<()> {
    let cfg = load_config(cli.configuration_file.as_ref())?;
    match &cli.cmd {
        None | Some(Cmd::Serve) => serve(cfg, cli.log_format).await,
        // As a CI job through the proxy: no admin token.
        Some(Cmd::Agent(cli::args::AgentCmd::Diff(d))) if d.server.is_some() => {
            diff_exit(kas::diff::run_as_ci_job(d, &mut cli::output::Stdout).await?)
        }
        Some(Cmd::Agent(a)) => agent_cmd(&admin_client(&cli, &cfg)?, a, &cfg).await,
        Some(Cmd::Token(t)) => token_cmd(&admin_client(&cli, &cfg)?, t).await,
        Some(Cmd::Project(p)) => project_cmd(&admin_client(&cli, &cfg)?, p).await,
        Some(Cmd::UserToken(u)) => user_token_cmd(&admin_client(&cli, &cfg)?, &cfg, u).await,
        Some(Cmd::Store(s)) => store_cmd(&cfg, s).await,
        Some(Cmd::Config(ConfigCmd::Validate { file })) => validate_agent_config(file),
        Some(Cmd::Man { dir }) => {
            let pages = cli::man::write_pages(<Cli as clap::CommandFactory>::command(), dir)?;
            eprintln!("{} man pages written to {}", pages.len(), dir.display());
            Ok(())
        }
        Some(Cmd::Completions { shell }) => {
            // Generated into memory, then written as any other output: clap_complete panics
            // on a write error, and `kas completions bash | head` must end quietly (exit 0).
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut cmd, "kas", &mut script);
            use std::io::Write as _;
            std::io::stdout()
                .lock()
                .write_all(&script)
                .map_err(cli::output::on_stdout)?;
            Ok(())
        }
        Some(Cmd::Kubeconfig {
            server,
            id_token_file,
            ca_cert_file,
            output,
        }) => {
            ci_kubeconfig(
                server,
                id_token_file,
                ca_cert_file.as_deref(),
                output.as_deref(),
            )
            .await
        }
    }
}

async fn serve(cfg: Config, log_format: tether_observability::LogFormat) -> Result<()> {
    let level = tether_observability::parse_level(&cfg.observability.logging.level)?;
    let _log = tether_observability::init_logging_as(level, log_format);
    // One crypto provider for every TLS use in the process.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (shutdown_delay, shutdown_timeout) = (cfg.shutdown_delay, cfg.shutdown_timeout);
    let running = kas::server::start(cfg).await.context("starting kas")?;
    tracing::info!(
        agent = %running.agent_addr,
        api = %running.api_addr,
        observability = %running.observability_addr,
        version = tether_build_info::LONG_VERSION,
        "kas is up"
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        () = running.stopped() => {}
    }
    tracing::info!("kas is stopping");
    running.drain(shutdown_delay).await;
    running
        .shutdown(shutdown_timeout + kas::server::CLOSE_GRACE)
        .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `cmd`'s arguments without help text, and its subcommands', as `kas sub --arg`.
    fn undocumented(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            if id != "help" && id != "version" && arg.get_help().is_none() {
                out.push(format!("{path} {id}"));
            }
        }
        for sub in cmd.get_subcommands() {
            if sub.get_about().is_none() && sub.get_name() != "help" {
                out.push(format!("{path} {}", sub.get_name()));
            }
            undocumented(sub, &format!("{path} {}", sub.get_name()), out);
        }
    }

    #[test]
    fn only_standard_output_closed_by_its_reader_exits_0() {
        let stdout_cut = anyhow::Error::from(cli::output::on_stdout(
            std::io::ErrorKind::BrokenPipe.into(),
        ))
        .context("printing the agents");
        assert_eq!(ending(&stdout_cut, 1), Ending::Quiet(0));
        // `kas agent diff` or `serve` losing its connection: a failure, said, with its code.
        let connection = anyhow::Error::from(std::io::Error::from(std::io::ErrorKind::BrokenPipe))
            .context("reading kas's answer");
        assert_eq!(ending(&connection, kas::diff::EXIT_ERROR), Ending::Said(2));
        assert_eq!(ending(&connection, 1), Ending::Said(1));
        let refused = anyhow::Error::from(Reported { code: 5 });
        assert_eq!(ending(&refused, 1), Ending::Quiet(5));
    }

    #[test]
    fn the_main_commands_show_examples_in_their_help() {
        let root = <Cli as clap::CommandFactory>::command();
        let main = [
            &[][..],
            &["agent", "list"],
            &["agent", "status"],
            &["agent", "reconcile"],
            &["agent", "suspend"],
            &["agent", "resume"],
            &["agent", "delete"],
            &["user-token", "create"],
            &["user-token", "list"],
            &["project", "add"],
        ];
        for path in main {
            let cmd = path.iter().fold(&root, |c, name| {
                c.find_subcommand(name).expect("a subcommand")
            });
            let help = cmd.get_after_help().map(ToString::to_string);
            assert!(
                help.is_some_and(|h| h.starts_with("Examples:\n  kas")),
                "kas {path:?} --help has no examples"
            );
        }
    }

    #[test]
    fn every_command_and_argument_has_help_text() {
        let mut missing = Vec::new();
        undocumented(
            &<Cli as clap::CommandFactory>::command(),
            "kas",
            &mut missing,
        );
        assert!(missing.is_empty(), "no help text: {missing:?}");
    }

    #[test]
    fn a_malformed_membership_is_refused_when_the_command_line_is_parsed() {
        let args = [
            "kas",
            "user-token",
            "create",
            "--agent-id=1",
            "--username=alice",
            "--member=group:group:boss",
        ];
        let e = Cli::try_parse_from(args).expect_err("bad role");
        assert!(
            e.to_string()
                .contains("group:group:boss: role must be one of guest"),
            "{e}"
        );
        let ok = Cli::try_parse_from(args.map(|a| a.replace("boss", "maintainer")));
        assert!(ok.is_ok(), "{:?}", ok.err());
    }

    /// `--timeout` and `--expires-in` take 1 s to a year, refused naming the flag otherwise:
    /// `--timeout 18446744073709551615s` panicked, `--expires-in 1ms` was rounded to 0 and
    /// refused by kas naming its API field (E14).
    #[test]
    fn duration_flags_out_of_range_are_refused_naming_the_flag() {
        let reconcile = |t: &str| {
            Cli::try_parse_from(["kas", "agent", "reconcile", "1", "--wait", "--timeout", t])
        };
        let token = |t: &str| {
            let args = [
                "kas",
                "user-token",
                "create",
                "--agent-id=1",
                "--username=a",
            ];
            Cli::try_parse_from(args.into_iter().chain(["--expires-in", t]))
        };
        for bad in ["0s", "1ms", "18446744073709551615s", "2y"] {
            let e = reconcile(bad).expect_err(bad).to_string();
            assert!(
                e.contains("--timeout") && e.contains("is not between 1s and"),
                "{e}"
            );
            let e = token(bad).expect_err(bad).to_string();
            assert!(e.contains("--expires-in"), "{e}");
        }
        assert!(reconcile("10m").is_ok() && token("30d").is_ok());
    }
}
