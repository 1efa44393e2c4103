//! The `ferry` command line: parses arguments into validated requests and hands them to the
//! library crates. Nothing else lives here.
//!
//! Exit codes: 0 success; 1 the operation failed (I/O, protocol, server error); 2 usage error
//! (bad arguments, malformed URI).

mod checksum_cmd;
mod copy_cmd;
mod demo;
mod endpoint;
mod info;
mod interrupt;
mod logging;
mod map;
mod nbd_server_cmd;
mod qcow2_out;
mod serve_cmd;
mod ticket_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit code for a failed operation.
pub const EXIT_FAILED: u8 = 1;
/// Exit code for bad usage (arguments, URIs).
pub const EXIT_USAGE: u8 = 2;

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Move virtual-machine disk images fast and safely",
    after_help = "Exit status: 0 success, 1 operation failed, 2 usage error."
)]
struct Cli {
    /// How log lines on stderr look: `text` (coloured only on a terminal, never with
    /// NO_COLOR) or `json` (one object a line). RUST_LOG sets the levels (default warn).
    #[arg(long, global = true, value_enum, default_value_t = logging::LogFormat::Text)]
    log_format: logging::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Copy a disk image between files, block devices, NBD servers, pipes, `null:` and
    /// socket-activated servers (`[ qemu-nbd -f qcow2 disk.qcow2 ]`); nbdcopy-compatible.
    Copy(copy_cmd::CopyArgs),
    /// Print the block checksum of an image (ovirt-imageio's /checksum or nbdcopy's
    /// --blkhash), hashing on all cores and skipping zero extents.
    Checksum(checksum_cmd::ChecksumArgs),
    /// Show what an NBD server (or a local file) offers: size, block sizes, flags, contexts.
    Info(info::InfoArgs),
    /// Print the extents (data, zero, hole) of an NBD export or a local file.
    Map(map::MapArgs),
    /// Serve a raw file, block device or (read-only) qcow2 image over NBD (qemu-nbd-like;
    /// socket activation works).
    NbdServer(nbd_server_cmd::NbdServerArgs),
    /// Run the main job on an embedded sample image and verify the results.
    Demo(demo::DemoArgs),
    /// Serve images over HTTP like ovirt-imageio's daemon (ticket control API + data API).
    Serve(serve_cmd::ServeArgs),
    /// Manage the tickets of a running `ferry serve` (add, show, mod, del, list).
    Ticket(ticket_cmd::TicketArgs),
}

/// An error with the exit code it maps to.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub error: anyhow::Error,
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure {
            code: EXIT_FAILED,
            error: e.into(),
        }
    }
}

/// Builds a usage failure (exit code 2).
pub fn usage(msg: impl std::fmt::Display) -> Failure {
    Failure {
        code: EXIT_USAGE,
        error: anyhow::anyhow!("{msg}"),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse_from(endpoints::extract_commands(std::env::args_os().collect()));
    logging::init(cli.log_format);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Command::Copy(args) = &cli.command
        && args.threads > 0
    {
        builder.worker_threads(args.threads as usize);
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferry: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Copy(args) => copy_cmd::run(args).await,
            Command::Checksum(args) => checksum_cmd::run(args).await,
            Command::Info(args) => info::run(args).await,
            Command::Map(args) => map::run(args).await,
            Command::Demo(args) => demo::run(args).await,
            Command::NbdServer(args) => nbd_server_cmd::run(args).await,
            Command::Serve(args) => serve_cmd::run(args).await,
            Command::Ticket(args) => ticket_cmd::run(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("ferry: {:#}", f.error);
            ExitCode::from(f.code)
        }
    }
}
