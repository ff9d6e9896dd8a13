//! Publishing a message to a topic: what the `produce` step and the dead-letter topic need
//! from Kafka, without Kafka. `dcflow-kafka` implements [`Publish`]; the workflow crate only
//! holds `Arc<dyn Publish>`, so neither it nor its tests build librdkafka.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// Why a message was not published (the broker's error, as text and source).
pub type PublishError = Box<dyn std::error::Error + Send + Sync>;

/// The broker's answer: the partition and offset the message was written at.
pub type Published<'a> =
    Pin<Box<dyn Future<Output = Result<(i32, i64), PublishError>> + Send + 'a>>;

pub trait Publish: Send + Sync {
    /// The topic this publisher writes to.
    fn topic(&self) -> &str;
    /// Publishes one message and waits until the broker has it.
    fn publish<'a>(&'a self, key: Option<&'a str>, payload: &'a [u8]) -> Published<'a>;
}

/// Opens a publisher for a topic (the binary passes one built on `[kafka]`).
pub type Connect<'a> = &'a (dyn Fn(&str) -> Result<Arc<dyn Publish>, PublishError> + Sync);
