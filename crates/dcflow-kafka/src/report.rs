//! librdkafka's logs and errors, as an operator wants to read them.
//!
//! With its brokers gone, librdkafka logs every reconnection attempt and reports each as an
//! error: about 40 lines a second. Here an outage is one warning when it starts (through
//! [`Health`], which also reminds once a minute and says when it ends), and any other
//! librdkafka warning or error is logged at most once a minute per facility, with a count of
//! the ones held back. Whether a broker is up comes from librdkafka's statistics (every
//! [`STATISTICS_MS`]): librdkafka reports no "connected again" event of its own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dcflow_core::{Health, Upstream};
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use tracing::{debug, error, info, warn};

/// How often librdkafka reports its statistics (brokers' states), in milliseconds.
pub const STATISTICS_MS: &str = "5000";
/// One warning per facility per this long.
const ONCE_PER: Duration = Duration::from_secs(60);

/// The [`ClientContext`] of every dcflow Kafka client.
#[derive(Default)]
pub struct Reporter {
    health: Option<Arc<Health>>,
    /// Per facility: when its last line was logged, and how many were held back since.
    logged: Mutex<HashMap<String, (Instant, u64)>>,
}

impl Reporter {
    /// Reports outages to `health` (the consumer's; producers report only their errors).
    pub fn new(health: Option<Arc<Health>>) -> Self {
        Self {
            health,
            logged: Mutex::default(),
        }
    }

    fn kafka_down(&self) -> bool {
        self.health
            .as_ref()
            .is_some_and(|h| h.is_down(Upstream::Kafka))
    }

    /// Whether a warning of `facility` may be logged now, and how many were held back.
    fn allow(&self, facility: &str) -> Option<u64> {
        let mut logged = self.logged.lock().expect("report lock");
        match logged.get_mut(facility) {
            Some((at, held)) if at.elapsed() < ONCE_PER => {
                *held += 1;
                None
            }
            Some((at, held)) => {
                *at = Instant::now();
                Some(std::mem::take(held))
            }
            None => {
                logged.insert(facility.to_owned(), (Instant::now(), 0));
                Some(0)
            }
        }
    }

    fn warn_limited(&self, facility: &str, severe: bool, message: &str) {
        // During an outage the outage's own warning says it all.
        if self.kafka_down() {
            debug!(facility, "kafka: {message}");
            return;
        }
        let Some(held) = self.allow(facility) else {
            debug!(facility, "kafka: {message}");
            return;
        };
        let more = if held > 0 {
            format!(" ({held} more like it in the last minute)")
        } else {
            String::new()
        };
        if severe {
            error!(facility, "kafka: {message}{more}");
        } else {
            warn!(facility, "kafka: {message}{more}");
        }
    }
}

impl Reporter {
    /// An error that the consuming loop received in place of a message: an outage when no
    /// broker is left, else a rate-limited warning.
    pub fn consumer_error(&self, error: &KafkaError) {
        let code = match error {
            KafkaError::MessageConsumption(code) | KafkaError::Global(code) => Some(*code),
            _ => None,
        };
        match (code, &self.health) {
            (Some(RDKafkaErrorCode::AllBrokersDown), Some(health)) => {
                health.down(Upstream::Kafka, &error.to_string())
            }
            (_, Some(health)) => health.error(Upstream::Kafka, &error.to_string()),
            (_, None) => self.warn_limited("consumer", false, &error.to_string()),
        }
    }
}

impl ClientContext for Reporter {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => self.warn_limited(fac, true, message),
            RDKafkaLogLevel::Warning => self.warn_limited(fac, false, message),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                info!(facility = fac, "kafka: {message}")
            }
            RDKafkaLogLevel::Debug => debug!(facility = fac, "kafka: {message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let code = match &error {
            KafkaError::Global(code) => Some(*code),
            _ => None,
        };
        match (code, &self.health) {
            // Reaching the end of a partition is not a problem.
            (Some(RDKafkaErrorCode::PartitionEOF), _) => {}
            // librdkafka reconnects by itself; an outage is told once, through Health.
            (Some(RDKafkaErrorCode::AllBrokersDown), Some(health)) => {
                health.down(Upstream::Kafka, reason)
            }
            (_, Some(health)) => health.error(Upstream::Kafka, &format!("{error}: {reason}")),
            (_, None) => self.warn_limited("error", false, &format!("{error}: {reason}")),
        }
    }

    fn stats_raw(&self, statistics: &[u8]) {
        let Some(health) = &self.health else { return };
        match brokers_up(statistics) {
            Some((up, _)) if up > 0 => health.up(Upstream::Kafka),
            // No broker known yet, or a client that is closing: nothing to tell.
            Some((_, states)) if states.is_empty() => {}
            Some((_, states)) => health.down(
                Upstream::Kafka,
                &format!("no broker connected (their states: {})", states.join(", ")),
            ),
            None => {}
        }
    }
}

/// The topic reader of `dcflow retry --dead-letters` is a plain consumer.
impl rdkafka::consumer::ConsumerContext for Reporter {}

/// From librdkafka's statistics JSON: how many brokers are `UP`, and each broker's state as
/// "name STATE". The bootstrap entries and the group coordinator's alias are included: any
/// of them up means a connection.
fn brokers_up(statistics: &[u8]) -> Option<(usize, Vec<String>)> {
    #[derive(serde::Deserialize)]
    struct Stats {
        #[serde(default)]
        brokers: std::collections::BTreeMap<String, Broker>,
    }
    #[derive(serde::Deserialize)]
    struct Broker {
        state: String,
    }
    let stats: Stats = serde_json::from_slice(statistics).ok()?;
    let up = stats.brokers.values().filter(|b| b.state == "UP").count();
    let states = stats
        .brokers
        .iter()
        .map(|(name, b)| format!("{name} {}", b.state))
        .collect();
    Some((up, states))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_tell_whether_a_broker_is_up() {
        let up = br#"{"name":"rdkafka#consumer-1","brokers":{"127.0.0.1:9092/1":{"name":"127.0.0.1:9092/1","nodeid":1,"state":"UP"},"GroupCoordinator":{"state":"UP","nodeid":-1}}}"#;
        assert_eq!(brokers_up(up).unwrap().0, 2);
        let down = br#"{"brokers":{"127.0.0.1:9092/bootstrap":{"state":"TRY_CONNECT","nodeid":-1},"127.0.0.1:9092/1":{"state":"CONNECT"}}}"#;
        let (n, states) = brokers_up(down).unwrap();
        assert_eq!(n, 0);
        assert_eq!(
            states,
            [
                "127.0.0.1:9092/1 CONNECT",
                "127.0.0.1:9092/bootstrap TRY_CONNECT"
            ]
        );
        assert!(brokers_up(b"not json").is_none());
    }

    #[test]
    fn a_facility_is_logged_once_a_minute_with_the_count_held_back() {
        let r = Reporter::new(None);
        assert_eq!(r.allow("FAIL"), Some(0));
        for _ in 0..40 {
            assert_eq!(r.allow("FAIL"), None);
        }
        assert_eq!(
            r.allow("ERROR"),
            Some(0),
            "another facility has its own minute"
        );
        r.logged.lock().unwrap().get_mut("FAIL").unwrap().0 -= ONCE_PER;
        assert_eq!(r.allow("FAIL"), Some(40));
    }

    #[test]
    fn an_outage_goes_to_health_and_its_end_comes_from_the_statistics() {
        let health = Arc::new(Health::new(Duration::ZERO));
        let r = Reporter::new(Some(health.clone()));
        r.error(
            KafkaError::Global(RDKafkaErrorCode::AllBrokersDown),
            "1/1 brokers are down",
        );
        assert!(health.is_down(Upstream::Kafka));
        r.stats_raw(br#"{"brokers":{"b/1":{"state":"CONNECT"}}}"#);
        assert!(health.is_down(Upstream::Kafka));
        r.stats_raw(br#"{"brokers":{"b/1":{"state":"UP"}}}"#);
        assert!(!health.is_down(Upstream::Kafka));
        r.stats_raw(br#"{"brokers":{"b/1":{"state":"TRY_CONNECT"}}}"#);
        assert!(
            health.is_down(Upstream::Kafka),
            "no broker up is an outage too"
        );
    }
}
