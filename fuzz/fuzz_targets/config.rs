//! Config parsing: the TOML file and the flags of `run`/`validate`, resolved as the agent
//! resolves them. Any input must give a `Config` or a `ConfigError`, never a panic.
//!
//! The file reader takes a path only (`RunArgs::config`), so each input is written to one
//! temporary file, rewritten per input. The same bytes are then split at newlines into an
//! argv after `sds-agent run`. Neither half reads the process environment or any file but
//! that temporary one.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use clap::Parser;
use libfuzzer_sys::fuzz_target;
use sds_agent::config::{Cli, Command, RunArgs};

/// The temporary directory (kept for the life of the process) and the file inside it.
fn config_path() -> &'static PathBuf {
    static PATH: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &PATH
        .get_or_init(|| {
            // Fuzz set-up, not input: a failure here is a broken machine.
            let dir = tempfile::tempdir().expect("temporary directory");
            let path = dir.path().join("config.toml");
            (dir, path)
        })
        .1
}

/// No environment: only what the input says.
fn no_env(_: &str) -> Option<String> {
    None
}

fuzz_target!(|data: &[u8]| {
    let path = config_path();
    if std::fs::write(path, data).is_ok() {
        let args = RunArgs {
            config: Some(path.clone()),
            ..RunArgs::default()
        };
        let _ = args.resolve_with_env(&no_env);
    }

    let text = String::from_utf8_lossy(data);
    let argv = ["sds-agent", "run"]
        .into_iter()
        .chain(text.split('\n'))
        .map(str::to_owned);
    if let Ok(cli) = Cli::try_parse_from(argv) {
        if let Command::Run(mut args) | Command::Validate(mut args) = cli.command {
            // `--config` may name any path (a FIFO, /dev/zero): read the input's own file
            // instead, which the first half has just written.
            if args.config.is_some() {
                args.config = Some(path.clone());
            }
            let _ = args.resolve_with_env(&no_env);
        }
    }
});
