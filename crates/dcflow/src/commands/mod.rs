//! One module per command. [`execute`] runs the one the command line names; it ends in `Ok`
//! or in a [`Failure`], which `main` turns into the exit code, in one match:
//!
//! ```text
//! Ok                     0   every selected file done or already present; a clean stop
//! Failure::Work          1   files failed (recorded), or the work itself failed
//! Failure::Setup         2   usage, configuration, credentials; a run that could not go on
//! ```

pub mod catalog;
pub mod check;
#[cfg(feature = "demo")]
pub mod demo;
pub mod dispatch;
pub mod man;
pub mod replay;
pub mod retry;
pub mod run;
pub mod status;
pub mod sync;

use std::path::Path;
use std::sync::Arc;

use dcflow_core::{Config, Env};
use dcflow_workflow::{Pipeline, Summary};

use crate::cli::Command;
use crate::daemon::Daemon;

/// Why a command did not end well; see the module's table.
#[derive(Debug)]
pub enum Failure {
    /// Usage, configuration or credentials, or a run that could not go on: exit 2.
    Setup {
        who: &'static str,
        error: anyhow::Error,
    },
    /// The command ran and some of its work failed: exit 1. `None`: the failures were
    /// reported already (a summary that names the failure records).
    Work {
        who: &'static str,
        error: Option<anyhow::Error>,
    },
}

impl Failure {
    pub fn setup(who: &'static str, error: anyhow::Error) -> Self {
        Self::Setup { who, error }
    }

    pub fn work(who: &'static str, error: anyhow::Error) -> Self {
        Self::Work {
            who,
            error: Some(error),
        }
    }
}

pub async fn execute(command: Command) -> Result<(), Failure> {
    match command {
        Command::Run {
            config,
            drain_seconds,
            until_caught_up,
        } => run::command(&config.path, drain_seconds, until_caught_up).await,
        Command::Replay { config, events } => replay::command(&config.path, &events).await,
        Command::Sync {
            config,
            dry_run,
            since,
            then_follow,
            drain_seconds,
        } => {
            sync::command(
                &config.path,
                dry_run,
                since.as_deref(),
                then_follow,
                std::time::Duration::from_secs(drain_seconds),
            )
            .await
        }
        Command::Retry {
            config,
            failures,
            dead_letters,
        } => retry::command(&config.path, failures.as_deref(), dead_letters).await,
        Command::CheckConfig { config, offline } => check::command(&config.path, offline).await,
        Command::Dispatch {
            config,
            until_caught_up,
        } => dispatch::command(&config.path, until_caught_up).await,
        Command::Catalog {
            config,
            database,
            workflow,
            path,
            json,
        } => catalog::command(
            config.or_else(default_config).as_deref(),
            database,
            workflow.as_deref(),
            path.as_deref(),
            json,
        ),
        Command::Status {
            config,
            address,
            json,
        } => status::command(config.or_else(default_config).as_deref(), address, json).await,
        Command::Completions { shell } => man::completions(shell),
        Command::Man => man::man(),
        #[cfg(feature = "demo")]
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
            demo::command(
                dir,
                files,
                max_size_mib,
                kafka,
                dcache.map(|url| (url, topic, proxy, token, capath)),
            )
            .await
        }
        #[cfg(not(feature = "demo"))]
        Command::Demo { .. } => Err(Failure::setup(
            "dcflow demo",
            anyhow::anyhow!("this dcflow was built without the demo (cargo feature `demo`)"),
        )),
    }
}

/// `/etc/dcflow/dcflow.toml` where it exists, for the commands whose configuration is
/// optional (`status`, `catalog`).
fn default_config() -> Option<std::path::PathBuf> {
    let p = std::path::PathBuf::from(crate::cli::DEFAULT_CONFIG);
    p.exists().then_some(p)
}

pub(crate) fn load_config(path: &Path) -> Result<Config, Failure> {
    Config::load(path, &Env::from_process())
        .map_err(|e| Failure::setup("dcflow", anyhow::anyhow!("{}: {e}", path.display())))
}

/// The configuration and its pipeline (credentials loaded, records opened). For the daemon
/// (`daemon` given), with `[metrics] address`, the status endpoint is served from here on;
/// `replay` and `retry` leave that address to the daemon that may be running with the same
/// configuration.
pub(crate) async fn load_pipeline(
    path: &Path,
    daemon: Option<&Daemon>,
) -> Result<(Config, Arc<Pipeline>), Failure> {
    let cfg = load_config(path)?;
    let pipeline = crate::pipeline(&cfg)
        .map(Arc::new)
        .map_err(|e| Failure::setup("dcflow", e))?;
    if let (Some(address), Some(daemon)) = (cfg.metrics_address, daemon) {
        crate::metrics::serve(address, pipeline.clone(), daemon)
            .await
            .map_err(|e| Failure::setup("dcflow", e))?;
    }
    Ok((cfg, pipeline))
}

/// The end of a batch (replay, retry): 0 all selected files done, 1 a failure row written (a
/// file that failed or a malformed message), 2 an error.
pub(crate) fn finish_batch(
    result: anyhow::Result<Summary>,
    pipeline: &Pipeline,
) -> Result<(), Failure> {
    let summary = result.map_err(|e| Failure::setup("dcflow", e))?;
    tracing::info!("done: {summary}");
    println!("{summary}");
    // Every failure row counts: a malformed message is recorded as one too.
    let rows = summary.failed + summary.malformed;
    if rows > 0 {
        println!(
            "failures recorded in {} ({rows} row{})",
            pipeline.failed_file().display(),
            if rows == 1 { "" } else { "s" }
        );
        return Err(Failure::Work {
            who: "dcflow",
            error: None,
        });
    }
    Ok(())
}
