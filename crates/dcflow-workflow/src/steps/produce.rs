//! The `produce` step: the event and its context as one message on a Kafka topic, through
//! the `Publish` the binary gave the pipeline; waits for the broker.

use dcflow_core::Template;
use tracing::info;

use super::{Context as StepContext, StepError};
use crate::pipeline::Pipeline;

impl Pipeline {
    /// Publishes the event and context to a Kafka topic and waits for the broker.
    pub(crate) async fn produce_step(
        &self,
        ctx: &StepContext,
        topic: &str,
        key: &Template,
        event: &serde_json::Value,
    ) -> Result<(), StepError> {
        let producer = self
            .producers
            .get(topic)
            .ok_or_else(|| StepError::fatal(format!("no producer for topic {topic}")))?;
        let key = ctx.render(key)?;
        let message = serde_json::json!({
            "workflow": ctx.values.get("workflow"),
            "event": event,
            "context": ctx.as_json(),
        });
        producer
            .publish(Some(&key), message.to_string().as_bytes())
            .await
            .map(|(partition, offset)| {
                info!(
                    topic,
                    partition,
                    offset,
                    "PRODUCE to {topic} (partition {partition}, offset {offset})"
                );
            })
            .map_err(|e| StepError::retry(format!("producing to {topic}: {e}")))
    }
}
