//! Whether the servers that dcflow depends on answer: the Kafka brokers, dCache's SSE frontend
//! and its WebDAV door.
//!
//! The sources and the transfer engine report what they see; an outage is logged once when it
//! starts, reminded once a minute while it lasts, and logged once when it ends, instead of once
//! per failed connection (librdkafka alone retries several times a second: an unreachable
//! broker used to write about 40 lines a second). The status endpoint reads it: `/readyz`
//! answers 503 once an upstream has been down longer than `[metrics] outagegrace`, and the
//! status page, `dcflow status` and `/metrics` show each upstream's state and last error.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tracing::{info, warn};

/// A server dcflow depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Upstream {
    Kafka,
    Frontend,
    Door,
}

impl Upstream {
    pub const ALL: [Upstream; 3] = [Upstream::Kafka, Upstream::Frontend, Upstream::Door];

    /// The label of metrics and the key of the status JSON.
    pub fn name(self) -> &'static str {
        match self {
            Upstream::Kafka => "kafka",
            Upstream::Frontend => "frontend",
            Upstream::Door => "door",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Upstream::Kafka => "the Kafka brokers",
            Upstream::Frontend => "dCache's frontend (SSE)",
            Upstream::Door => "dCache's WebDAV door",
        }
    }

    fn are(self) -> &'static str {
        match self {
            Upstream::Kafka => "are",
            Upstream::Frontend | Upstream::Door => "is",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// How often an outage that goes on is logged again.
pub const REMIND_EVERY: Duration = Duration::from_secs(60);
/// The longest error text kept (a librdkafka or TLS error is a line; a body is not).
const ERROR_BYTES: usize = 512;

#[derive(Debug, Default)]
struct Part {
    /// Reported on at least once (an upstream dcflow does not use stays out of the status).
    used: bool,
    down_since: Option<(Instant, OffsetDateTime)>,
    last_error: Option<(OffsetDateTime, String)>,
    errors: u64,
    /// When the last warning about this upstream was logged, and the errors since.
    warned: Option<Instant>,
    unlogged: u64,
}

/// One upstream's state, for the status page, `dcflow status` and `/metrics`.
#[derive(Debug, Clone)]
pub struct UpstreamState {
    pub upstream: Upstream,
    pub up: bool,
    /// Since when it is down.
    pub down_since: Option<OffsetDateTime>,
    pub down_for: Option<Duration>,
    pub last_error: Option<(OffsetDateTime, String)>,
    /// Errors reported since the process started.
    pub errors: u64,
}

/// The upstreams' states. Cheap to report to: a mutex per upstream, taken briefly.
#[derive(Debug)]
pub struct Health {
    parts: [Mutex<Part>; 3],
    grace: Duration,
}

impl Default for Health {
    fn default() -> Self {
        Self::new(Duration::from_secs(60))
    }
}

impl Health {
    /// `grace`: how long an upstream may be down before [`Health::outages`] reports it.
    pub fn new(grace: Duration) -> Self {
        Self {
            parts: Default::default(),
            grace,
        }
    }

    fn part(&self, up: Upstream) -> std::sync::MutexGuard<'_, Part> {
        self.parts[up.index()].lock().expect("health lock")
    }

    /// `up` cannot be reached now (refused or reset connections, DNS or TLS failures, no
    /// broker up). The first report of an outage is logged as a warning, later ones once a
    /// minute with how many there were.
    pub fn down(&self, up: Upstream, error: &str) {
        let error = bounded(error);
        let mut p = self.part(up);
        p.used = true;
        p.errors += 1;
        p.last_error = Some((OffsetDateTime::now_utc(), error.clone()));
        match p.down_since {
            None => {
                p.down_since = Some((Instant::now(), OffsetDateTime::now_utc()));
                p.warned = Some(Instant::now());
                p.unlogged = 0;
                warn!(
                    upstream = up.name(),
                    "{} {} unreachable: {error} (logged again every minute while it lasts)",
                    up.what(),
                    up.are()
                );
            }
            Some((since, at)) => {
                if p.warned.is_none_or(|w| w.elapsed() >= REMIND_EVERY) {
                    let n = p.unlogged + 1;
                    p.warned = Some(Instant::now());
                    p.unlogged = 0;
                    warn!(
                        upstream = up.name(),
                        "{} {} still unreachable, for {} since {} ({n} errors in the last minute): {error}",
                        up.what(),
                        up.are(),
                        human(since.elapsed()),
                        rfc3339(at),
                    );
                } else {
                    p.unlogged += 1;
                }
            }
        }
    }

    /// An error that does not by itself mean that `up` is unreachable (one broker of several,
    /// a refused commit): kept as the last error, logged at most once a minute.
    pub fn error(&self, up: Upstream, error: &str) {
        let error = bounded(error);
        let mut p = self.part(up);
        p.used = true;
        p.errors += 1;
        p.last_error = Some((OffsetDateTime::now_utc(), error.clone()));
        if p.warned.is_none_or(|w| w.elapsed() >= REMIND_EVERY) {
            let more = std::mem::take(&mut p.unlogged);
            p.warned = Some(Instant::now());
            if more > 0 {
                warn!(
                    upstream = up.name(),
                    "{}: {error} ({more} more errors in the last minute)",
                    up.what()
                );
            } else {
                warn!(upstream = up.name(), "{}: {error}", up.what());
            }
        } else {
            p.unlogged += 1;
        }
    }

    /// `up` answered. Ends an outage (logged with its length).
    pub fn up(&self, up: Upstream) {
        let mut p = self.part(up);
        p.used = true;
        if let Some((since, _)) = p.down_since.take() {
            p.warned = None;
            p.unlogged = 0;
            info!(
                upstream = up.name(),
                "{} {} reachable again after {}",
                up.what(),
                up.are(),
                human(since.elapsed())
            );
        }
    }

    pub fn is_down(&self, up: Upstream) -> bool {
        self.part(up).down_since.is_some()
    }

    /// Every upstream that was reported on.
    pub fn states(&self) -> Vec<UpstreamState> {
        Upstream::ALL
            .iter()
            .filter_map(|&up| {
                let p = self.part(up);
                p.used.then(|| UpstreamState {
                    upstream: up,
                    up: p.down_since.is_none(),
                    down_since: p.down_since.map(|(_, at)| at),
                    down_for: p.down_since.map(|(since, _)| since.elapsed()),
                    last_error: p.last_error.clone(),
                    errors: p.errors,
                })
            })
            .collect()
    }

    /// The outages that have lasted longer than the grace, each as one line (what `/readyz`
    /// answers with its 503).
    pub fn outages(&self) -> Vec<String> {
        self.states()
            .into_iter()
            .filter(|s| s.down_for.is_some_and(|d| d > self.grace))
            .map(|s| {
                format!(
                    "{} {} unreachable for {} (since {}): {}",
                    s.upstream.what(),
                    s.upstream.are(),
                    human(s.down_for.unwrap_or_default()),
                    s.down_since.map(rfc3339).unwrap_or_default(),
                    s.last_error.map(|(_, e)| e).unwrap_or_default()
                )
            })
            .collect()
    }
}

fn bounded(error: &str) -> String {
    crate::text::bounded(error, ERROR_BYTES).into_owned()
}

pub fn rfc3339(t: OffsetDateTime) -> String {
    t.replace_nanosecond(0)
        .unwrap_or(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// "45 s", "3 min 20 s", "2 h 5 min".
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_is_reported_after_the_grace_and_ends_when_the_upstream_answers() {
        let h = Health::new(Duration::from_millis(50));
        assert!(h.states().is_empty(), "nothing reported yet");
        h.up(Upstream::Kafka);
        h.down(Upstream::Door, "connect 127.0.0.1:1: connection refused");
        assert!(h.is_down(Upstream::Door));
        assert!(h.outages().is_empty(), "within the grace");
        std::thread::sleep(Duration::from_millis(80));
        let outages = h.outages();
        assert_eq!(outages.len(), 1, "{outages:?}");
        assert!(
            outages[0].contains("WebDAV door is unreachable"),
            "{outages:?}"
        );
        assert!(outages[0].contains("connection refused"), "{outages:?}");
        let states = h.states();
        assert_eq!(states.len(), 2, "kafka and the door were used: {states:?}");
        assert!(states[0].up && !states[1].up);
        h.up(Upstream::Door);
        assert!(h.outages().is_empty());
        let door = &h.states()[1];
        assert!(door.up);
        assert_eq!(door.errors, 1);
        assert!(door.last_error.as_ref().unwrap().1.contains("refused"));
    }

    #[test]
    fn errors_that_are_not_outages_do_not_make_an_upstream_down_and_long_errors_are_cut() {
        let h = Health::new(Duration::ZERO);
        let long = "x".repeat(10_000);
        for _ in 0..100 {
            h.error(Upstream::Kafka, &long);
        }
        assert!(!h.is_down(Upstream::Kafka));
        assert!(h.outages().is_empty());
        let s = &h.states()[0];
        assert_eq!(s.errors, 100);
        let kept = &s.last_error.as_ref().unwrap().1;
        assert!(
            kept.len() < 600 && kept.ends_with("(10000 bytes)"),
            "{}",
            kept.len()
        );
    }

    #[test]
    fn durations_read_as_an_operator_writes_them() {
        assert_eq!(human(Duration::from_secs(45)), "45 s");
        assert_eq!(human(Duration::from_secs(200)), "3 min 20 s");
        assert_eq!(human(Duration::from_secs(7500)), "2 h 5 min");
    }
}
