//! dCache's billing output to Kafka, behind the `kafka` feature (default on): without it the
//! emulator builds without librdkafka (the transfer engine's tests use it that way) and
//! refuses a configuration that asks for Kafka.

#[cfg(not(feature = "kafka"))]
use anyhow::Result;

/// dCache's Kafka billing output.
#[derive(Debug, Clone)]
pub struct SimKafka {
    pub brokers: String,
    pub topic: String,
    /// dCache's billing topic usually has one partition.
    pub partitions: i32,
}

#[cfg(feature = "kafka")]
mod real {
    use anyhow::Result;
    use rdkafka::error::KafkaError;
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
    use rdkafka::types::RDKafkaErrorCode;
    use rdkafka::ClientConfig;

    use super::SimKafka;

    /// dCache's Kafka output: topic `billing` by default, null keys, the JSON text as value.
    pub struct KafkaSink {
        producer: ThreadedProducer<DefaultProducerContext>,
        topic: String,
    }

    impl KafkaSink {
        pub fn new(brokers: &str, topic: &str) -> Result<Self, KafkaError> {
            let producer = ClientConfig::new()
                .set("bootstrap.servers", brokers)
                .set("linger.ms", "5")
                .create()?;
            Ok(Self {
                producer,
                topic: topic.to_owned(),
            })
        }

        pub fn send(&self, line: &str) {
            let mut record: BaseRecord<'_, (), str> = BaseRecord::to(&self.topic).payload(line);
            loop {
                match self.producer.send(record) {
                    Ok(()) => return,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        record = r;
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                    Err((e, _)) => {
                        tracing::warn!(error = %e, "billing message not produced");
                        return;
                    }
                }
            }
        }

        pub fn flush(&self) {
            let _ = self.producer.flush(std::time::Duration::from_secs(30));
        }
    }

    pub async fn kafka_sink(kafka: Option<&SimKafka>) -> Result<Option<KafkaSink>> {
        let Some(k) = kafka else { return Ok(None) };
        use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
        let admin: AdminClient<rdkafka::client::DefaultClientContext> =
            rdkafka::ClientConfig::new()
                .set("bootstrap.servers", &k.brokers)
                .create()?;
        // A topic that exists already is used as it is (librdkafka's mock cluster, for one, has
        // topics created up front and does not answer CreateTopics).
        let exists = admin
            .inner()
            .fetch_metadata(Some(&k.topic), std::time::Duration::from_secs(10))
            .is_ok_and(|m| {
                m.topics().iter().any(|t| {
                    t.name() == k.topic && t.error().is_none() && !t.partitions().is_empty()
                })
            });
        if exists {
            return Ok(Some(KafkaSink::new(&k.brokers, &k.topic)?));
        }
        let topic = NewTopic::new(&k.topic, k.partitions, TopicReplication::Fixed(1));
        for r in admin.create_topics([&topic], &AdminOptions::new()).await? {
            match r {
                Ok(_) | Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((t, e)) => anyhow::bail!("cannot create topic {t}: {e}"),
            }
        }
        Ok(Some(KafkaSink::new(&k.brokers, &k.topic)?))
    }
}

#[cfg(feature = "kafka")]
pub use real::{kafka_sink, KafkaSink};

/// Without the `kafka` feature: nothing to publish to.
#[cfg(not(feature = "kafka"))]
pub struct KafkaSink;

#[cfg(not(feature = "kafka"))]
impl KafkaSink {
    pub fn send(&self, _line: &str) {}
    pub fn flush(&self) {}
}

#[cfg(not(feature = "kafka"))]
pub async fn kafka_sink(kafka: Option<&SimKafka>) -> Result<Option<KafkaSink>> {
    match kafka {
        None => Ok(None),
        Some(_) => anyhow::bail!("dcache-sim was built without its `kafka` feature: it cannot publish billing messages to Kafka"),
    }
}
