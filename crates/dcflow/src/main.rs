//! The `dcflow` command: parse, log, run one command (`commands::execute`), and turn its end
//! into the exit code, here only: 0 success, 1 a file (or the work) failed, 2 usage,
//! configuration or credential error, or a run that could not go on.

use std::process::ExitCode;

use clap::Parser;
use dcflow::cli::{init_logging, Cli, Command};
use dcflow::commands::{execute, Failure};

/// mimalloc for Rust and, through its `override` feature, for librdkafka's C code: with
/// glibc's malloc the consuming thread spent most of its time waiting on the arena lock that
/// librdkafka's broker thread holds (messages are allocated there and freed here).
/// Transparent huge pages are off for dcflow (mimalloc's `no_thp`, which stops it asking for
/// them, and `main`'s prctl, for systems where THP is `always`): with 2 MiB pages behind each
/// thread's heap, 64 transfers (64 writer threads) peaked at 265–283 MiB instead of about
/// 110 MiB (bench/large_files.py). `exec` steps give their programs THP back.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // SAFETY: this prctl only sets a flag of this process (see ALLOCATOR).
    unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    let cli = Cli::parse();
    // The demo prints its own progress; its logs would scroll it away (DCFLOW_LOG=info shows
    // them). The emulator's and the mock cluster's own clients log through rdkafka's default
    // context (targets `librdkafka` and `rdkafka::client`; dcflow's own clients log through
    // dcflow_kafka::report): at the end they report the cluster going away, an ERROR that is
    // not one.
    let default_level = if matches!(cli.command, Command::Demo { .. }) {
        "warn,librdkafka=off,rdkafka::client=off"
    } else {
        "info"
    };
    init_logging(
        cli.log_format,
        &dcflow::cli::log_level(default_level, cli.verbose, cli.quiet),
    );
    // The commands that only print end quietly on a closed pipe (`dcflow status --json |
    // head`), as Unix filters do, instead of panicking in println!. The others keep Rust's
    // ignored SIGPIPE: the daemon's sockets must not kill it.
    if matches!(
        cli.command,
        Command::Status { .. }
            | Command::Catalog { .. }
            | Command::CheckConfig { .. }
            | Command::Man
            | Command::Completions { .. }
    ) {
        // SAFETY: restores the default disposition of one signal, before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let ended = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(execute(cli.command)),
        Err(e) => Err(Failure::setup(
            "dcflow",
            anyhow::anyhow!("cannot start the runtime: {e}"),
        )),
    };
    match ended {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Work { who, error }) => {
            if let Some(e) = error {
                eprintln!("{who}: {e:#}");
            }
            ExitCode::from(1)
        }
        Err(Failure::Setup { who, error }) => {
            eprintln!("{who}: {error:#}");
            ExitCode::from(2)
        }
    }
}
