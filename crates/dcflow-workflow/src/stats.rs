//! Counters and live activity of a run: what the summaries of `replay` and `retry` print,
//! and what the binary's HTTP endpoint serves (`/metrics`, `/status.json`). No server here,
//! no global: one [`Stats`] and one [`Activity`] per pipeline.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dcflow_core::health::UpstreamState;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde_json::json;
use time::OffsetDateTime;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabel {
    pub partition: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabel {
    upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CredentialLabel {
    credential: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, Ord, PartialOrd, EncodeLabelSet)]
struct JobStateLabel {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabel {
    pub workflow: String,
    pub step: String,
    pub result: String,
}

/// Counters of a run: the summaries of `replay` and `retry`, and `/metrics`.
#[derive(Debug)]
pub struct Stats {
    /// Messages taken from the source.
    pub events: Counter,
    pub malformed: Counter,
    pub not_upload: Counter,
    pub outside_folder: Counter,
    /// Under the folder, but no workflow's rule matched.
    pub unmatched: Counter,
    pub duplicates: Counter,
    pub selected: Counter,
    pub transfers_started: Counter,
    pub copied: Counter,
    pub already_present: Counter,
    pub failed: Counter,
    /// Attempts beyond the first, over all transfers.
    pub retries: Counter,
    pub bytes: Counter,
    pub in_flight: Gauge,
    pub duration: Histogram,
    pub last_success: Gauge<f64, AtomicU64>,
    pub lag: Family<PartitionLabel, Gauge>,
    pub steps: Family<StepLabel, Counter>,
    /// SSE source: stream reconnections, and resynchronisations (listings of the tree).
    pub sse_reconnects: Counter,
    pub sse_resyncs: Counter,
    /// Per upstream (kafka, frontend, door): 1 when it answers, 0 during an outage; and the
    /// errors reported (mirrored from `dcflow_core::Health` when `/metrics` is read).
    upstream_up: Family<UpstreamLabel, Gauge>,
    upstream_errors: Family<UpstreamLabel, Counter>,
    /// Files waiting for tape now (`[tape]`).
    tape_waiting: Gauge,
    /// Slurm jobs of the slurm steps: followed now by state (and `waiting`: not submitted yet,
    /// for a `maxjobs` slot), and ended by state.
    slurm_jobs: Family<JobStateLabel, Gauge>,
    slurm_ended: Family<JobStateLabel, Counter>,
    slurm_states: Mutex<std::collections::BTreeSet<String>>,
    /// When the proxy and the token run out (Unix seconds), per credential.
    credential_expiry: Family<CredentialLabel, Gauge>,
    /// This process, as Prometheus's own clients name it (read from /proc at each scrape).
    process: ProcessMetrics,
    /// The last consumer lag per partition, as logged (also in `lag`).
    last_lag: Mutex<BTreeMap<i32, i64>>,
    registry: Registry,
}

impl Default for Stats {
    // Long on purpose: the registration of every exported metric, one after the other.
    fn default() -> Self {
        let mut registry = Registry::default();
        let skipped = Family::<Reason, Counter>::default();
        let reason = |r: &str| skipped.get_or_create(&Reason { reason: r.into() }).clone();
        let stats = Self {
            events: Counter::default(),
            malformed: reason("malformed"),
            not_upload: reason("not_upload"),
            outside_folder: reason("outside_folder"),
            unmatched: reason("no_workflow"),
            duplicates: reason("duplicate"),
            selected: Counter::default(),
            transfers_started: Counter::default(),
            copied: Counter::default(),
            already_present: Counter::default(),
            failed: Counter::default(),
            retries: Counter::default(),
            bytes: Counter::default(),
            in_flight: Gauge::default(),
            // 0.1 s … about 3.6 h.
            duration: Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.1, 2.0, 18,
            )),
            last_success: Gauge::default(),
            lag: Family::default(),
            steps: Family::default(),
            sse_reconnects: Counter::default(),
            sse_resyncs: Counter::default(),
            upstream_up: Family::default(),
            upstream_errors: Family::default(),
            credential_expiry: Family::default(),
            tape_waiting: Gauge::default(),
            slurm_jobs: Family::default(),
            slurm_ended: Family::default(),
            slurm_states: Mutex::default(),
            process: ProcessMetrics::default(),
            last_lag: Mutex::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "dcflow_events_consumed",
            "Billing messages taken from the source",
            stats.events.clone(),
        );
        r.register(
            "dcflow_events_skipped",
            "Messages that start no work, by reason",
            skipped,
        );
        r.register(
            "dcflow_events_selected",
            "Events that start at least one workflow",
            stats.selected.clone(),
        );
        r.register(
            "dcflow_transfers_started",
            "Copies started",
            stats.transfers_started.clone(),
        );
        r.register(
            "dcflow_transfers_succeeded",
            "Copies verified and at their final path (bytes moved)",
            stats.copied.clone(),
        );
        r.register(
            "dcflow_transfers_already_present",
            "Copies found already present with the same size and checksum",
            stats.already_present.clone(),
        );
        r.register(
            "dcflow_transfers_failed",
            "Files whose workflow failed after its retries (recorded)",
            stats.failed.clone(),
        );
        r.register(
            "dcflow_transfer_retries",
            "Transfer attempts beyond the first",
            stats.retries.clone(),
        );
        r.register(
            "dcflow_bytes_copied",
            "Bytes written to final paths",
            stats.bytes.clone(),
        );
        r.register(
            "dcflow_transfers_in_flight",
            "Copies running now",
            stats.in_flight.clone(),
        );
        r.register(
            "dcflow_transfer_duration_seconds",
            "Duration of successful copies, retries included",
            stats.duration.clone(),
        );
        r.register(
            "dcflow_last_success_timestamp_seconds",
            "Unix time of the last successful copy",
            stats.last_success.clone(),
        );
        r.register(
            "dcflow_consumer_lag",
            "Messages between the committed offset and the end, per partition",
            stats.lag.clone(),
        );
        r.register(
            "dcflow_sse_reconnects",
            "SSE source: event stream reconnections",
            stats.sse_reconnects.clone(),
        );
        r.register(
            "dcflow_sse_resyncs",
            "SSE source: resynchronisations by listing the watched tree",
            stats.sse_resyncs.clone(),
        );
        r.register(
            "dcflow_workflow_steps",
            "Workflow steps ended, by workflow, step kind and result",
            stats.steps.clone(),
        );
        r.register(
            "dcflow_upstream_up",
            "1 while the upstream (kafka, frontend, door) answers, 0 during an outage",
            stats.upstream_up.clone(),
        );
        r.register(
            "dcflow_upstream_errors",
            "Errors reported by or about the upstream (kafka, frontend, door)",
            stats.upstream_errors.clone(),
        );
        r.register(
            "dcflow_credential_expiry_timestamp_seconds",
            "Unix time at which the credential (proxy, token) expires",
            stats.credential_expiry.clone(),
        );
        r.register(
            "dcflow_tape_waiting",
            "Files on tape only, waiting for dCache to stage them",
            stats.tape_waiting.clone(),
        );
        r.register(
            "dcflow_slurm_jobs",
            "Slurm jobs of slurm steps now, by state (waiting: for a maxjobs slot, not submitted)",
            stats.slurm_jobs.clone(),
        );
        r.register(
            "dcflow_slurm_jobs_ended",
            "Slurm jobs of slurm steps seen to end, by state",
            stats.slurm_ended.clone(),
        );
        stats.process.register(r);
        Self { registry, ..stats }
    }
}

impl Stats {
    pub fn get(c: &Counter) -> u64 {
        c.get()
    }
    pub fn inc(c: &Counter) {
        c.inc();
    }

    /// Mirrors the upstreams' states into `dcflow_upstream_up` and `dcflow_upstream_errors`.
    pub fn set_upstreams(&self, states: &[UpstreamState]) {
        for state in states {
            let label = UpstreamLabel {
                upstream: state.upstream.name().to_owned(),
            };
            self.upstream_up
                .get_or_create(&label)
                .set(i64::from(state.up));
            let errors = self.upstream_errors.get_or_create(&label);
            errors.inc_by(state.errors.saturating_sub(errors.get()));
        }
    }

    /// Sets `dcflow_credential_expiry_timestamp_seconds` per credential.
    pub fn set_credential_expiries(&self, expiries: &[(&str, i64)]) {
        for (credential, at) in expiries {
            self.credential_expiry
                .get_or_create(&CredentialLabel {
                    credential: (*credential).to_owned(),
                })
                .set(*at);
        }
    }

    pub fn set_tape_waiting(&self, n: u64) {
        self.tape_waiting.set(n as i64);
    }

    /// Mirrors the Slurm client's counts into `dcflow_slurm_jobs` and `_ended`.
    pub fn set_slurm(&self, c: &crate::steps::slurm::Counts) {
        let mut states = self.slurm_states.lock().expect("lock");
        states.insert("waiting".into());
        states.extend(c.active.keys().cloned());
        for state in states.iter() {
            let now = match state.as_str() {
                "waiting" => c.waiting_for_slot,
                s => c.active.get(s).copied().unwrap_or(0),
            };
            self.slurm_jobs
                .get_or_create(&JobStateLabel {
                    state: state.clone(),
                })
                .set(now as i64);
        }
        for (state, n) in &c.ended {
            let ended = self.slurm_ended.get_or_create(&JobStateLabel {
                state: state.clone(),
            });
            ended.inc_by(n.saturating_sub(ended.get()));
        }
    }

    /// Reads this process's figures from /proc (at each scrape).
    pub fn refresh_process(&self) {
        self.process.refresh();
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }
}

/// The `process_*` metrics of Prometheus's client libraries: CPU seconds, resident and virtual
/// memory, start time, open and allowed file descriptors, threads.
#[derive(Debug, Default)]
struct ProcessMetrics {
    cpu_seconds: Counter<f64, AtomicU64>,
    resident_bytes: Gauge,
    virtual_bytes: Gauge,
    start_time: Gauge<f64, AtomicU64>,
    open_fds: Gauge,
    max_fds: Gauge,
    threads: Gauge,
}

impl ProcessMetrics {
    fn register(&self, r: &mut Registry) {
        // A counter: prometheus-client writes it as process_cpu_seconds_total.
        r.register(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            self.cpu_seconds.clone(),
        );
        r.register(
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            self.resident_bytes.clone(),
        );
        r.register(
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes",
            self.virtual_bytes.clone(),
        );
        r.register(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds",
            self.start_time.clone(),
        );
        r.register(
            "process_open_fds",
            "Number of open file descriptors",
            self.open_fds.clone(),
        );
        r.register(
            "process_max_fds",
            "Maximum number of open file descriptors",
            self.max_fds.clone(),
        );
        r.register(
            "process_threads",
            "Number of OS threads in the process",
            self.threads.clone(),
        );
    }

    /// From /proc/self/stat (fields 14, 15, 20, 22, 23, 24 of proc(5)), /proc/stat's btime,
    /// /proc/self/fd and RLIMIT_NOFILE. A field that cannot be read keeps its last value.
    fn refresh(&self) {
        // SAFETY: sysconf and getrlimit only read process-wide values.
        let (ticks, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK).max(1) as f64,
                libc::sysconf(libc::_SC_PAGESIZE).max(1) as i64,
            )
        };
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            // The command name may hold spaces and parentheses: fields start after the last ')'.
            let fields: Vec<&str> = stat
                .rsplit_once(')')
                .map(|(_, rest)| rest.split_whitespace().collect())
                .unwrap_or_default();
            // `rest` starts at field 3 (state): field n is fields[n - 3].
            let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<i64>().ok());
            if let (Some(utime), Some(stime)) = (field(14), field(15)) {
                // Counters only go up: by what the kernel counted since the last scrape.
                let total = (utime + stime) as f64 / ticks;
                let seen = self.cpu_seconds.get();
                if total > seen {
                    self.cpu_seconds.inc_by(total - seen);
                }
            }
            if let Some(t) = field(20) {
                self.threads.set(t);
            }
            if let (Some(start), Some(boot)) = (field(22), boot_time()) {
                self.start_time.set(boot as f64 + start as f64 / ticks);
            }
            if let Some(v) = field(23) {
                self.virtual_bytes.set(v);
            }
            if let Some(rss) = field(24) {
                self.resident_bytes.set(rss * page);
            }
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds.set(fds.count() as i64);
        }
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: a valid pointer to a rlimit.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
            self.max_fds.set(limit.rlim_cur.min(i64::MAX as u64) as i64);
        }
    }
}

fn boot_time() -> Option<i64> {
    std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

/// A copy running now.
#[derive(Debug)]
pub struct Active {
    pub workflow: String,
    pub path: String,
    pub destination: String,
    pub size: Option<u64>,
    pub bytes: Arc<AtomicU64>,
    pub started: Instant,
}

/// A workflow that ended for one file.
#[derive(Debug, Clone)]
pub struct Ended {
    pub time: OffsetDateTime,
    pub workflow: String,
    pub path: String,
    pub ok: bool,
    pub bytes: u64,
    pub seconds: f64,
    pub error: String,
}

/// How many ended workflows the status keeps.
const RECENT: usize = 50;
/// Throughput samples: one every 10 s for an hour.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(10);
const SAMPLES: usize = 360;

/// What the daemon is doing, for the status page and `dcflow status`.
#[derive(Debug, Default)]
pub struct Activity {
    next: AtomicU64,
    active: Mutex<BTreeMap<u64, Active>>,
    recent: Mutex<VecDeque<Ended>>,
    /// (unix seconds, total bytes copied) samples.
    history: Mutex<VecDeque<(i64, u64)>>,
    ready: AtomicBool,
    pub source: Mutex<String>,
}

impl Activity {
    /// Registers a running copy; the returned id ends it.
    pub fn start(&self, a: Active) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.active.lock().expect("activity lock").insert(id, a);
        id
    }

    /// Bytes received so far by the copies running now.
    pub fn bytes_in_flight(&self) -> u64 {
        self.active
            .lock()
            .expect("activity lock")
            .values()
            .map(|a| a.bytes.load(Ordering::Relaxed))
            .sum()
    }

    pub fn stop(&self, id: u64) {
        self.active.lock().expect("activity lock").remove(&id);
    }

    pub fn ended(&self, e: Ended) {
        let mut recent = self.recent.lock().expect("activity lock");
        recent.push_front(e);
        recent.truncate(RECENT);
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    pub fn sample(&self, bytes: u64) {
        let mut h = self.history.lock().expect("activity lock");
        h.push_back((OffsetDateTime::now_utc().unix_timestamp(), bytes));
        while h.len() > SAMPLES + 1 {
            h.pop_front();
        }
    }

    /// Everything the status page shows.
    pub fn snapshot(&self, stats: &Stats) -> serde_json::Value {
        let active: Vec<_> = self
            .active
            .lock()
            .expect("activity lock")
            .values()
            .map(|a| {
                let bytes = a.bytes.load(Ordering::Relaxed);
                let secs = a.started.elapsed().as_secs_f64();
                json!({
                    "workflow": a.workflow, "path": a.path, "destination": a.destination,
                    "size": a.size, "bytes": bytes, "seconds": secs,
                    "mbps": if secs > 0.0 { bytes as f64 * 8.0 / secs / 1e6 } else { 0.0 },
                })
            })
            .collect();
        let recent: Vec<_> = self
            .recent
            .lock()
            .expect("activity lock")
            .iter()
            .map(|e| {
                json!({
                    "time": e.time.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
                    "workflow": e.workflow, "path": e.path, "ok": e.ok, "bytes": e.bytes,
                    "seconds": e.seconds, "error": e.error,
                })
            })
            .collect();
        let history = self.history.lock().expect("activity lock");
        let rate = |a: &(i64, u64), b: &(i64, u64)| {
            let dt = (b.0 - a.0).max(1) as f64;
            json!([b.0, (b.1.saturating_sub(a.1)) as f64 / dt])
        };
        let mut throughput: Vec<_> = history
            .iter()
            .zip(history.iter().skip(1))
            .map(|(a, b)| rate(a, b))
            .collect();
        // The rate since the last sample, so the chart is never more than moments behind.
        let now = (
            OffsetDateTime::now_utc().unix_timestamp(),
            Stats::get(&stats.bytes),
        );
        if let Some(last) = history.back().filter(|l| now.0 > l.0) {
            throughput.push(rate(last, &now));
        }
        let lag: BTreeMap<String, i64> = stats
            .last_lag
            .lock()
            .expect("lag lock")
            .iter()
            .map(|(p, l)| (p.to_string(), *l))
            .collect();
        let g = Stats::get;
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "source": *self.source.lock().expect("activity lock"),
            "ready": self.is_ready(),
            "counters": {
                "events": g(&stats.events), "selected": g(&stats.selected),
                "copied": g(&stats.copied), "already_present": g(&stats.already_present),
                "failed": g(&stats.failed), "retries": g(&stats.retries),
                "bytes": g(&stats.bytes), "in_flight": stats.in_flight.get(),
                "malformed": g(&stats.malformed),
            },
            "lag": lag,
            "active": active,
            "recent": recent,
            "throughput": throughput,
        })
    }
}

/// The upstreams' states for the status page and `dcflow status`: per name, whether it is
/// up, since when it is down, the last error and when it came.
pub fn upstreams_json(states: &[UpstreamState]) -> serde_json::Value {
    let t = |t: OffsetDateTime| dcflow_core::health::rfc3339(t);
    let map: serde_json::Map<String, serde_json::Value> = states
        .iter()
        .map(|s| {
            (
                s.upstream.name().to_owned(),
                json!({
                    "up": s.up,
                    "down_since": s.down_since.map(t),
                    "down_seconds": s.down_for.map(|d| d.as_secs()),
                    "last_error": s.last_error.as_ref().map(|(_, e)| e),
                    "last_error_time": s.last_error.as_ref().map(|(at, _)| t(*at)),
                    "errors": s.errors,
                }),
            )
        })
        .collect();
    serde_json::Value::Object(map)
}

impl Stats {
    /// Records the consumer lag of the assigned partitions.
    pub fn set_lag(&self, lag: &BTreeMap<i32, i64>) {
        *self.last_lag.lock().expect("lag lock") = lag.clone();
        self.lag.clear();
        for (p, l) in lag {
            self.lag
                .get_or_create(&PartitionLabel {
                    partition: p.to_string(),
                })
                .set(*l);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `dcflow_*` name the Grafana dashboard queries is one this exporter serves.
    #[test]
    fn the_dashboard_uses_exactly_the_exported_names() {
        let stats = Stats::default();
        stats
            .lag
            .get_or_create(&PartitionLabel {
                partition: "0".into(),
            })
            .set(1);
        stats
            .steps
            .get_or_create(&StepLabel {
                workflow: "w".into(),
                step: "copy".into(),
                result: "done".into(),
            })
            .inc();
        let exported = stats.encode();
        let names: std::collections::BTreeSet<&str> = exported
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .collect();
        let dashboard = include_str!("../../../contrib/grafana/dcflow-dashboard.json");
        let mut used = std::collections::BTreeSet::new();
        for (i, _) in dashboard.match_indices("dcflow_") {
            let name: String = dashboard[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            used.insert(name);
        }
        used.remove("dcflow_"); // the dashboard's tag and uid, not a metric
        assert!(used.len() >= 12, "{used:?}");
        for name in &used {
            assert!(
                names.contains(name.as_str()),
                "{name} is not exported: {names:?}"
            );
        }
    }
}
