//! The command line: `dcflow <command>`, as operators' scripts and systemd units call it
//! (the contract in DESIGN.md). Each command is carried out by its module in `commands/`.

use std::path::PathBuf;

use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};

/// Where the configuration is when neither `--config` nor `$DCFLOW_CONFIG` says.
pub const DEFAULT_CONFIG: &str = "/etc/dcflow/dcflow.toml";

#[derive(Parser)]
#[command(
    name = "dcflow",
    version,
    about = "dCache storage events in, verified files out"
)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// More detail in the log: -v debug, -vv trace (DCFLOW_LOG, when set, decides instead).
    #[arg(short, long, global = true, action = ArgAction::Count)]
    pub verbose: u8,
    /// Less: -q warnings and errors only, -qq errors only.
    #[arg(short, long, global = true, action = ArgAction::Count, conflicts_with = "verbose")]
    pub quiet: u8,
    #[command(subcommand)]
    pub command: Command,
}

/// `-c/--config FILE`, as every command that needs a configuration takes it.
#[derive(Args, Clone)]
pub struct ConfigFile {
    /// The configuration file (TOML; see examples/dcflow.toml for every key). Default:
    /// $DCFLOW_CONFIG, then /etc/dcflow/dcflow.toml.
    #[arg(short = 'c', long = "config", value_name = "FILE", env = "DCFLOW_CONFIG", default_value = DEFAULT_CONFIG)]
    pub path: PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
pub enum Command {
    /// The daemon: take events from the configured source (the [kafka] billing topic, or
    /// dCache's storage events with [sse]) until SIGTERM or SIGINT, which stop taking events,
    /// let running transfers finish (up to --drain-seconds), acknowledge what finished (Kafka
    /// commit, SSE saved event id) and exit 0. A second signal exits at once (130).
    Run {
        #[command(flatten)]
        config: ConfigFile,
        /// How long running transfers may take to finish after a stop signal.
        #[arg(long, default_value_t = 120)]
        drain_seconds: u64,
        /// Exit (0) once every assigned partition was read to its end and its transfers
        /// finished: work off a backlog, or measure.
        #[arg(long)]
        until_caught_up: bool,
    },
    /// Run every billing message of a JSONL file (`-` = stdin) through the pipeline, then exit:
    /// 0 if every selected file succeeded or was already present, 1 if any failed.
    Replay {
        #[command(flatten)]
        config: ConfigFile,
        /// JSONL file of dCache billing messages, one per line; `-` for stdin.
        events: PathBuf,
    },
    /// Copy what dCache holds already: walk pool + folder on the door (the WebDAV listing,
    /// one folder at a time, streamed) and send every file through the same workflows as an
    /// event would: what the destination lacks, or holds with another size or checksum, is
    /// copied. Exit codes as replay.
    Sync {
        #[command(flatten)]
        config: ConfigFile,
        /// Say what would be copied and sum it up (size compared, not checksums); write
        /// nothing.
        #[arg(long)]
        dry_run: bool,
        /// Only files modified at or after this date (2026-12-01) or time
        /// (2026-12-01T12:00:00Z).
        #[arg(long, value_name = "DATE")]
        since: Option<String>,
        /// Then follow new events from the moment the walk began, as `dcflow run`: the Kafka
        /// group's position (or the SSE channel) is pinned before the walk, so a file
        /// uploaded during it is handled once, not missed.
        #[arg(long, conflicts_with = "dry_run")]
        then_follow: bool,
        /// With --then-follow: how long running transfers may take to finish after a stop
        /// signal.
        #[arg(long, default_value_t = 120)]
        drain_seconds: u64,
    },
    /// Re-run recorded failures through the same pipeline: the rows of a failure CSV, or
    /// (with --dead-letters) every message of the dead-letter topic. Exit codes as replay.
    Retry {
        #[command(flatten)]
        config: ConfigFile,
        /// Failure CSV (e.g. the configured failedtasksfile).
        #[arg(
            required_unless_present = "dead_letters",
            conflicts_with = "dead_letters"
        )]
        failures: Option<PathBuf>,
        /// Read the failures from [kafka] deadlettertopic instead.
        #[arg(long)]
        dead_letters: bool,
    },
    /// Validate a configuration and summarise what dcflow will do; exit 2 listing problems.
    /// It also asks the door once (HEAD of url + folder) with the configured credentials.
    CheckConfig {
        #[command(flatten)]
        config: ConfigFile,
        /// Do not ask the door (no network).
        #[arg(long)]
        offline: bool,
    },
    /// Scale-out: move the uploads announced on `[kafka] topic` to `[kafka] worktopic`, keyed by
    /// pnfsid, for any number of `dcflow run` workers. Stops like `run`.
    Dispatch {
        #[command(flatten)]
        config: ConfigFile,
        /// Stop once every assigned partition of the billing topic is read to its end and
        /// what was selected is on the work topic (a catch-up run).
        #[arg(long)]
        until_caught_up: bool,
    },
    /// List the rows of a workflow catalog (the `catalog` step's SQLite file) as CSV, or as
    /// JSON lines with --json.
    Catalog {
        /// The configuration whose catalog steps name the database (or give --database).
        /// Default: $DCFLOW_CONFIG, then /etc/dcflow/dcflow.toml.
        #[arg(short = 'c', long, value_name = "FILE", env = "DCFLOW_CONFIG")]
        config: Option<PathBuf>,
        /// The SQLite file; needed when the configuration names several.
        #[arg(long)]
        database: Option<PathBuf>,
        /// Only rows of this workflow.
        #[arg(long)]
        workflow: Option<String>,
        /// Only billing paths matching this glob (`*`, `?`, `[...]`), e.g. '/pnfs/*/raw/*'.
        #[arg(long)]
        path: Option<String>,
        /// One JSON object per line instead of CSV.
        #[arg(long)]
        json: bool,
    },
    /// What the running daemon is doing, from its `[metrics] address`: counters, transfers
    /// in flight, lag, recent failures. Exit 1 when it cannot be reached.
    Status {
        /// The daemon's configuration (its [metrics] address is asked). Default:
        /// $DCFLOW_CONFIG, then /etc/dcflow/dcflow.toml.
        #[arg(short = 'c', long, value_name = "FILE", env = "DCFLOW_CONFIG")]
        config: Option<PathBuf>,
        /// The address to ask instead, e.g. 127.0.0.1:9464.
        #[arg(long)]
        address: Option<String>,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script: `dcflow completions bash > /etc/bash_completion.d/dcflow`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff): `dcflow man > /usr/share/man/man1/dcflow.1`.
    Man,
    /// The whole flow on an embedded default: dCache emulator, uploads, verified copies.
    Demo {
        /// Where to keep the emulator's state, the copies and the records (default: a new
        /// folder under $TMPDIR).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Number of files to upload and copy.
        #[arg(long, default_value_t = 24)]
        files: usize,
        /// Largest file size, in MiB.
        #[arg(long, default_value_t = 100)]
        max_size_mib: u64,
        /// A real Kafka broker (host:port) instead of librdkafka's in-process mock cluster.
        #[arg(long)]
        kafka: Option<String>,
        /// A real dCache instead of the emulator: its WebDAV door and a folder to work in
        /// (the demo uploads into a new folder below it), e.g. https://door:2880/public.
        /// Needs --kafka (the broker the door and pools publish billing to), --capath and
        /// --proxy or --token (allowed to upload there).
        #[arg(long, requires_all = ["kafka", "capath"])]
        dcache: Option<url::Url>,
        /// With --dcache: the billing topic.
        #[arg(long, default_value = "billing", requires = "dcache")]
        topic: String,
        /// With --dcache: an X.509 proxy (or certificate and key) PEM.
        #[arg(long, requires = "dcache")]
        proxy: Option<PathBuf>,
        /// With --dcache: a file holding a bearer token (a macaroon, say).
        #[arg(long, requires = "dcache")]
        token: Option<PathBuf>,
        /// With --dcache: the trusted CA folder.
        #[arg(long, requires = "dcache")]
        capath: Option<PathBuf>,
    },
}

/// The log filter for `-v`/`-q` from a command's usual level (`DCFLOW_LOG` overrides both).
pub fn log_level(usual: &str, verbose: u8, quiet: u8) -> String {
    const LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];
    if verbose == 0 && quiet == 0 {
        return usual.to_owned();
    }
    // The level first, then the usual per-target exceptions (`warn,librdkafka=off`).
    let (level, rest) = usual.split_once(',').unwrap_or((usual, ""));
    let base = LEVELS.iter().position(|l| *l == level).unwrap_or(2);
    let level = (base + usize::from(verbose)).saturating_sub(usize::from(quiet));
    let level = LEVELS[level.min(LEVELS.len() - 1)];
    if rest.is_empty() {
        level.to_owned()
    } else {
        format!("{level},{rest}")
    }
}

pub fn init_logging(format: LogFormat, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DCFLOW_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colours only on a terminal: journald and log files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
