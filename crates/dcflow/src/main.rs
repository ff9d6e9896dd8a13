//! The `dcflow` command. Exit codes are decided here only: 0 success, 1 a file failed,
//! 2 usage, configuration or credential error.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};

/// mimalloc for Rust and, through its `override` feature, for librdkafka's C code: with
/// glibc's malloc the consuming thread spent most of its time waiting on the arena lock that
/// librdkafka's broker thread holds (messages are allocated there and freed here).
/// Transparent huge pages are off for dcflow (mimalloc's `no_thp`, which stops it asking for
/// them, and `main`'s prctl, for systems where THP is `always`): with 2 MiB pages behind each
/// thread's heap, 64 transfers (64 writer threads) peaked at 265–283 MiB instead of about
/// 110 MiB (bench/large_files.py). `exec` steps give their programs THP back.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use dcflow::demo::{demo, DemoOptions};
use dcflow::replay::replay;
use dcflow_core::{Config, Env};
use dcflow_workflow::Pipeline;
use tokio_util::sync::CancellationToken;

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
    /// The daemon: consume the configured Kafka topic until SIGTERM or SIGINT, which stop
    /// fetching, let running transfers finish (up to --drain-seconds), commit and exit 0.
    /// A second signal exits at once.
    Run {
        #[arg(long)]
        config: PathBuf,
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
        #[arg(long)]
        config: PathBuf,
        /// JSONL file of dCache billing messages, one per line; `-` for stdin.
        events: PathBuf,
    },
    /// Re-run recorded failures through the same pipeline: the rows of a failure CSV, or
    /// (with --dead-letters) every message of the dead-letter topic. Exit codes as replay.
    Retry {
        #[arg(long)]
        config: PathBuf,
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
    CheckConfig {
        #[arg(long)]
        config: PathBuf,
    },
    /// Scale-out: move the uploads announced on `[kafka] topic` to `[kafka] worktopic`, keyed by
    /// pnfsid, for any number of `dcflow run` workers. Stops like `run`.
    Dispatch {
        #[arg(long)]
        config: PathBuf,
        /// Stop once every assigned partition of the billing topic is read to its end and
        /// what was selected is on the work topic (a catch-up run).
        #[arg(long)]
        until_caught_up: bool,
    },
    /// List the rows of a workflow catalog (the `catalog` step's SQLite file) as CSV, or as
    /// JSON lines with --json.
    Catalog {
        /// The configuration whose catalog steps name the database (or give --database).
        #[arg(long, required_unless_present = "database")]
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
        /// The daemon's configuration (its [metrics] address is asked).
        #[arg(long, required_unless_present = "address")]
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

fn init_logging(format: LogFormat, default: &str) {
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

fn load_config(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path, &Env::from_process()).map_err(|e| {
        eprintln!("dcflow: {}: {e}", path.display());
        ExitCode::from(2)
    })
}

/// The configuration and a pipeline built from it (credentials loaded, records opened).
/// The configuration and its pipeline. For the daemon (`serve`), with `[metrics] address`,
/// the status endpoint is served from here on; `replay` and `retry` leave that address to the
/// daemon that may be running with the same configuration.
async fn load_pipeline(path: &Path, serve: bool) -> Result<(Config, Arc<Pipeline>), ExitCode> {
    let cfg = load_config(path)?;
    let pipeline = match dcflow::pipeline(&cfg) {
        Ok(p) => Arc::new(p),
        Err(e) => {
            eprintln!("dcflow: {e:#}");
            return Err(ExitCode::from(2));
        }
    };
    if let Some(address) = cfg.metrics_address.filter(|_| serve) {
        if let Err(e) =
            dcflow::metrics::serve(address, pipeline.clone(), CancellationToken::new()).await
        {
            eprintln!("dcflow: {e:#}");
            return Err(ExitCode::from(2));
        }
    }
    Ok((cfg, pipeline))
}

fn main() -> ExitCode {
    // SAFETY: this prctl only sets a flag of this process (see ALLOCATOR).
    unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    let cli = Cli::parse();
    // The demo prints its own progress; its logs would scroll it away (DCFLOW_LOG=info shows
    // them). The emulator's and the mock cluster's own clients (rdkafka::client) report the
    // cluster going away at the end.
    let default_level = if matches!(cli.command, Command::Demo { .. }) {
        "warn,rdkafka::client=off"
    } else {
        "info"
    };
    init_logging(cli.log_format, default_level);
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
        Command::Catalog {
            config,
            database,
            workflow,
            path,
            json,
        } => {
            let database = match (database, config) {
                (Some(d), _) => d,
                (None, Some(config)) => {
                    let cfg = match load_config(&config) {
                        Ok(c) => c,
                        Err(code) => return code,
                    };
                    let mut names: Vec<PathBuf> = cfg
                        .workflow_rules
                        .iter()
                        .flat_map(|w| &w.steps)
                        .filter_map(|s| match s {
                            dcflow_core::Step::Catalog { database } => Some(database.clone()),
                            _ => None,
                        })
                        .collect();
                    names.sort();
                    names.dedup();
                    match names.as_slice() {
                        [one] => one.clone(),
                        [] => {
                            eprintln!("dcflow: {} has no catalog step", config.display());
                            return ExitCode::from(2);
                        }
                        many => {
                            eprintln!(
                                "dcflow: {} names several catalogs, choose one with --database: {}",
                                config.display(),
                                many.iter()
                                    .map(|p| p.display().to_string())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            );
                            return ExitCode::from(2);
                        }
                    }
                }
                (None, None) => unreachable!("clap requires one"),
            };
            match dcflow_workflow::catalog::query(&database, workflow.as_deref(), path.as_deref())
                .and_then(|rows| dcflow_workflow::catalog::print(&rows, json))
            {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("dcflow: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Status {
            config,
            address,
            json,
        } => {
            let address = match (address, config) {
                (Some(a), _) => a,
                (None, Some(config)) => match load_config(&config) {
                    Ok(cfg) => match cfg.metrics_address {
                        Some(a) => a.to_string(),
                        None => {
                            eprintln!(
                                "dcflow status: {} has no [metrics] address",
                                config.display()
                            );
                            return ExitCode::from(2);
                        }
                    },
                    Err(code) => return code,
                },
                (None, None) => unreachable!("clap requires one"),
            };
            match dcflow::status::fetch(&address).await {
                Ok(status) if json => {
                    println!("{status}");
                    ExitCode::SUCCESS
                }
                Ok(status) => {
                    print!("{}", dcflow::status::render(&status));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("dcflow status: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "dcflow", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Command::Man => {
            let cmd = <Cli as clap::CommandFactory>::command();
            let mut out = std::io::stdout();
            let rendered = clap_mangen::Man::new(cmd.clone())
                .render(&mut out)
                .and_then(|()| {
                    // One section per command, after the overview.
                    for sub in cmd.get_subcommands() {
                        use std::io::Write;
                        writeln!(out, ".SH \"DCFLOW {}\"", sub.get_name().to_uppercase())?;
                        let page = clap_mangen::Man::new(sub.clone());
                        page.render_description_section(&mut out)?;
                        page.render_options_section(&mut out)?;
                    }
                    Ok(())
                });
            match rendered {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("dcflow man: {e}");
                    ExitCode::from(1)
                }
            }
        }
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
            let (_, pipeline) = match load_pipeline(&config, false).await {
                Ok(loaded) => loaded,
                Err(code) => return code,
            };
            finish_batch(replay(pipeline.clone(), &events).await, &pipeline)
        }
        Command::Run {
            config,
            drain_seconds,
            until_caught_up,
        } => {
            let (cfg, pipeline) = match load_pipeline(&config, true).await {
                Ok(loaded) => loaded,
                Err(code) => return code,
            };
            let shutdown = CancellationToken::new();
            tokio::spawn(watch_signals(shutdown.clone()));
            let drain = std::time::Duration::from_secs(drain_seconds);
            let result = match (cfg.kafka.clone(), cfg.sse.clone()) {
                (Some(kafka), _) => {
                    dcflow::run::run_kafka(pipeline, &kafka, shutdown, drain, until_caught_up).await
                }
                (None, Some(sse)) => {
                    if until_caught_up {
                        eprintln!("dcflow run: --until-caught-up applies to Kafka only; ignored");
                    }
                    dcflow_sse::run_sse(
                        pipeline,
                        &sse,
                        cfg.dcache.url.clone(),
                        cfg.dcache.pool.clone(),
                        shutdown,
                        drain,
                    )
                    .await
                }
                (None, None) => {
                    eprintln!(
                        "dcflow run: {} has no source: add [kafka] (dCache's billing topic) or \
                         [sse] (dCache's storage events); `dcflow replay` reads a file",
                        config.display()
                    );
                    return ExitCode::from(2);
                }
            };
            match result {
                Ok(summary) => {
                    tracing::info!("stopped: {summary}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("dcflow run: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Retry {
            config,
            failures,
            dead_letters,
        } => {
            let (cfg, pipeline) = match load_pipeline(&config, false).await {
                Ok(loaded) => loaded,
                Err(code) => return code,
            };
            let result = match (&failures, cfg.kafka.as_ref()) {
                (Some(csv), _) => dcflow::retry::retry_csv(pipeline.clone(), csv).await,
                (None, Some(kafka)) if dead_letters => {
                    dcflow::retry::retry_dead_letters(pipeline.clone(), kafka).await
                }
                _ => Err(anyhow::anyhow!(
                    "--dead-letters needs a [kafka] section with deadlettertopic"
                )),
            };
            finish_batch(result, &pipeline)
        }
        Command::Dispatch {
            config,
            until_caught_up,
        } => {
            let cfg = match load_config(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let Some(kafka) = cfg.kafka.clone().filter(|k| k.work_topic.is_some()) else {
                eprintln!(
                    "dcflow dispatch: {} needs [kafka] with worktopic",
                    config.display()
                );
                return ExitCode::from(2);
            };
            let shutdown = CancellationToken::new();
            tokio::spawn(watch_signals(shutdown.clone()));
            match dcflow::dispatch::dispatch(&cfg, &kafka, shutdown, until_caught_up).await {
                Ok(s) => {
                    tracing::info!(
                        consumed = s.consumed,
                        forwarded = s.forwarded,
                        malformed = s.malformed,
                        "dispatch stopped"
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("dcflow dispatch: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Demo {
            dir,
            files,
            max_size_mib,
            kafka,
            dcache,
            topic,
            proxy,
            token,
            capath,
        } => {
            let dcache = match (dcache, capath) {
                (Some(url), Some(capath)) if proxy.is_some() || token.is_some() => {
                    Some(dcflow::demo::RealDcache {
                        url,
                        topic,
                        proxy,
                        token,
                        capath,
                    })
                }
                (Some(_), _) => {
                    eprintln!("dcflow demo --dcache needs --proxy or --token");
                    return ExitCode::from(2);
                }
                (None, _) => None,
            };
            match demo(DemoOptions {
                dir,
                files,
                max_size: max_size_mib << 20,
                kafka,
                dcache,
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

/// First SIGTERM/SIGINT: graceful stop. Second: exit at once (offsets not committed past
/// unfinished work are redelivered next time).
async fn watch_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    for n in 0..2 {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        if n == 0 {
            tracing::info!("stop signal: draining (send it again to exit at once)");
            shutdown.cancel();
        } else {
            tracing::warn!("second stop signal: exiting now");
            std::process::exit(130);
        }
    }
}

/// Exit code of a batch (replay, retry): 0 all selected files done, 1 a failure, 2 an error.
fn finish_batch(result: anyhow::Result<dcflow_workflow::Summary>, pipeline: &Pipeline) -> ExitCode {
    match result {
        Ok(summary) => {
            tracing::info!("done: {summary}");
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
