//! The `sds-agent` command: parses the command line and runs the chosen subcommand.

#![forbid(unsafe_code)]

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use clap::Parser;
use sds_agent::config::{Cli, Command};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Version => {
            drop(writeln!(
                std::io::stdout(),
                "sds-agent {}",
                env!("CARGO_PKG_VERSION")
            ));
            ExitCode::SUCCESS
        }
        Command::Validate(args) => match args.resolve() {
            Ok(config) => {
                if let Err(e) = check_ca(&config) {
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
            init_logging(config.log_level.as_deref());
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

/// `validate` also builds the CA, so bad CA files are caught before deployment.
fn check_ca(config: &sds_agent::config::Config) -> anyhow::Result<()> {
    // Some backends start a background task; give them a runtime to start it in.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let _entered = runtime.enter();
    sds_agent::build_ca(config).map(drop)
}

fn init_logging(level: Option<&str>) {
    let filter = match level {
        Some(l) => EnvFilter::try_new(l).unwrap_or_else(|e| {
            eprintln!("warning: bad --log-level {l:?} ({e}); using info");
            EnvFilter::new("info")
        }),
        // vaultrs and rustify log every failed call at ERROR; the vault backend logs what to
        // fix itself, so they are quiet unless asked for.
        None => EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| EnvFilter::new("info,vaultrs=off,rustify=off")),
    };
    // Colour only on a terminal: a file or a pipe (kubectl logs) gets plain text.
    tracing_subscriber::fmt()
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
