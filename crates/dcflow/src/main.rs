//! The `dcflow` command. Exit codes are decided here only: 0 success, 1 a file failed,
//! 2 usage, configuration or credential error.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use dcflow::demo::{demo, DemoOptions};
use dcflow::pipeline::Pipeline;
use dcflow::replay::replay;
use dcflow_core::{Config, Env};

#[derive(Parser)]
#[command(
    name = "dcflow",
    version,
    about = "dCache storage events in, verified files out"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// The daemon: consume the configured event source (Kafka) until SIGTERM.
    Run {
        #[arg(long)]
        config: PathBuf,
    },
    /// Run every billing message of a JSONL file (`-` = stdin) through the pipeline, then exit:
    /// 0 if every selected file succeeded or was already present, 1 if any failed.
    Replay {
        #[arg(long)]
        config: PathBuf,
        /// JSONL file of dCache billing messages, one per line; `-` for stdin.
        events: PathBuf,
    },
    /// Validate a configuration and summarise what dcflow will do; exit 2 listing problems.
    CheckConfig {
        #[arg(long)]
        config: PathBuf,
    },
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
    },
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DCFLOW_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
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

fn load_config(path: &PathBuf) -> Result<Config, ExitCode> {
    Config::load(path, &Env::from_process()).map_err(|e| {
        eprintln!("dcflow: {}: {e}", path.display());
        ExitCode::from(2)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("dcflow: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    runtime.block_on(async_main(cli.command))
}

async fn async_main(command: Command) -> ExitCode {
    match command {
        Command::CheckConfig { config } => {
            let cfg = match load_config(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match dcflow::check::check(&cfg, &config) {
                Ok(summary) => {
                    print!("{summary}");
                    ExitCode::SUCCESS
                }
                Err(problems) => {
                    eprintln!("dcflow: {}:", config.display());
                    problems.iter().for_each(|p| eprintln!("  {p}"));
                    ExitCode::from(2)
                }
            }
        }
        Command::Replay { config, events } => {
            let cfg = match load_config(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let pipeline = match Pipeline::try_new(&cfg) {
                Ok(p) => Arc::new(p),
                Err(e) => {
                    eprintln!("dcflow: {e:#}");
                    return ExitCode::from(2);
                }
            };
            match replay(pipeline.clone(), &events).await {
                Ok(summary) => {
                    tracing::info!("replay done: {summary}");
                    println!("{summary}");
                    if summary.failed > 0 {
                        println!("failures recorded in {}", pipeline.failed_file().display());
                        ExitCode::from(1)
                    } else {
                        ExitCode::SUCCESS
                    }
                }
                Err(e) => {
                    eprintln!("dcflow: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Run { config } => {
            if let Err(code) = load_config(&config) {
                return code;
            }
            eprintln!(
                "dcflow run: the Kafka and SSE sources are not implemented in this version; \
                 feed billing messages with `dcflow replay --config FILE EVENTS.jsonl`"
            );
            ExitCode::from(2)
        }
        Command::Demo {
            dir,
            files,
            max_size_mib,
        } => {
            match demo(DemoOptions {
                dir,
                files,
                max_size: max_size_mib << 20,
            })
            .await
            {
                Ok((summary, _)) if summary.failed == 0 => ExitCode::SUCCESS,
                Ok(_) => ExitCode::from(1),
                Err(e) => {
                    eprintln!("dcflow demo: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
    }
}
