//! The `sds-agent` command: parses the command line and runs the chosen subcommand.

#![forbid(unsafe_code)]

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use clap::Parser;
use sds_agent::client;
use sds_agent::config::{CaCommand, Cli, Command, LogFormat};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Version(args) => {
            ExitCode::from(client::version(args.output, &mut std::io::stdout()))
        }
        Command::Status(args) => {
            let code = block_on_client(client::status(
                &args,
                &mut std::io::stdout(),
                &mut std::io::stderr(),
            ));
            ExitCode::from(code)
        }
        Command::Rotate(args) => {
            let code = block_on_client(client::rotate(
                &args,
                &mut std::io::stdout(),
                &mut std::io::stderr(),
            ));
            ExitCode::from(code)
        }
        Command::Ca(CaCommand::Rotate(args)) => {
            let code = block_on_client(client::ca_rotate(
                &args,
                &mut std::io::stdout(),
                &mut std::io::stderr(),
            ));
            ExitCode::from(code)
        }
        Command::Validate(args) => match args.resolve() {
            Ok(config) => {
                if let Err(e) = log_filter(config.log_level.as_deref()) {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
                if let Err(e) = check_ca(&config)
                    .and_then(|()| sds_agent::check_node(&config))
                    .and_then(|()| sds_agent::check_federation(&config))
                {
                    eprintln!("error: {e:#}");
                    return ExitCode::from(2);
                }
                match serde_json::to_string_pretty(&config) {
                    // A closed stdout (`| head`) is not worth a panic.
                    Ok(json) => drop(writeln!(std::io::stdout(), "{json}")),
                    Err(e) => eprintln!("error: cannot print the configuration: {e}"),
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::Run(args) => {
            let config = match args.resolve() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            let filter = match log_filter(config.log_level.as_deref()) {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            init_logging(filter, config.log_format);
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(sds_agent::run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "sds-agent failed");
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Runs a client command on a small runtime of its own.
fn block_on_client(f: impl Future<Output = u8>) -> u8 {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(f),
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            client::EXIT_UNREACHABLE
        }
    }
}

/// `validate` also builds the CA, so bad CA files are caught before deployment (and, in node
/// mode, the kubelet client: [`sds_agent::check_node`]).
fn check_ca(config: &sds_agent::config::Config) -> anyhow::Result<()> {
    // Some backends start a background task; give them a runtime to start it in.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let _entered = runtime.enter();
    sds_agent::build_ca(config).map(drop)
}

/// The log filter: `--log-level`, else `RUST_LOG`, else info. A bad `--log-level` stops the
/// agent (exit 2) rather than silently logging something else.
fn log_filter(level: Option<&str>) -> Result<EnvFilter, String> {
    match level {
        Some(l) => EnvFilter::try_new(l).map_err(|e| {
            format!("invalid --log-level {l:?}: {e} (expected e.g. info, debug, or info,sds_agent=debug)")
        }),
        // vaultrs and rustify log every failed call at ERROR; the vault backend logs what to
        // fix itself, so they are quiet unless asked for.
        None => Ok(EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| EnvFilter::new("info,vaultrs=off,rustify=off"))),
    }
}

fn init_logging(filter: EnvFilter, format: LogFormat) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        // One JSON object per line: the event's fields at the top level, with the spans
        // it ran in, for log pipelines.
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .init(),
        // Colour only on a terminal: a file or a pipe (kubectl logs) gets plain text.
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}
