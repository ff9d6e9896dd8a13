//! The daemon's lifecycle, in one place: the stop signals, the root cancellation tokens and
//! the tracker of every long-lived task (the metrics server included).
//!
//! ```text
//! SIGTERM/SIGINT ──► stop token: the sources stop taking events and drain
//! second signal  ──► exit 130 at once (unfinished work is redelivered next time)
//! Daemon::finish ──► exit token: the metrics server and the other tasks end; waited for
//! ```

use std::future::Future;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub struct Daemon {
    stop: CancellationToken,
    exit: CancellationToken,
    tasks: TaskTracker,
}

impl Daemon {
    /// Installs the signal handlers.
    pub fn start() -> Self {
        let daemon = Self {
            stop: CancellationToken::new(),
            exit: CancellationToken::new(),
            tasks: TaskTracker::new(),
        };
        daemon
            .tasks
            .spawn(watch_signals(daemon.stop.clone(), daemon.exit.clone()));
        daemon
    }

    /// Cancelled by the first stop signal: the source stops taking events and drains.
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Cancelled once the command is done (after the drain): every long-lived task selects
    /// on it.
    pub fn exit_token(&self) -> CancellationToken {
        self.exit.clone()
    }

    /// Runs a long-lived task that ends when [`Daemon::exit_token`] is cancelled; waited for by
    /// [`Daemon::finish`].
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(task);
    }

    /// The tracker, for tasks that spawn their own (the metrics server's connections).
    pub fn tracker(&self) -> &TaskTracker {
        &self.tasks
    }

    /// Ends every task and waits for them.
    pub async fn finish(self) {
        self.stop.cancel();
        self.exit.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// First SIGTERM/SIGINT: graceful stop. Second: exit at once (offsets not committed past
/// unfinished work are redelivered next time).
async fn watch_signals(stop: CancellationToken, exit: CancellationToken) {
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
            _ = exit.cancelled() => return,
        }
        if n == 0 {
            tracing::info!("stop signal: draining (send it again to exit at once)");
            stop.cancel();
        } else {
            tracing::warn!("second stop signal: exiting now");
            std::process::exit(130);
        }
    }
}
