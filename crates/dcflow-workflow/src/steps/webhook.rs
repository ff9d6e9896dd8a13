//! The `webhook` step: the event and its context POSTed as JSON (or CloudEvents) to a URL.

use std::collections::BTreeMap;
use std::time::Duration;

use dcflow_core::workflow::{Template, WebhookFormat};
use dcflow_transfer::Credentials;
use tracing::info;

use super::{Context, StepError};

/// HTTP client for webhooks: TLS trusts the configured CA folder, never sends the grid proxy.
pub struct Webhooks {
    client: reqwest::Client,
}

impl Webhooks {
    pub fn try_new(creds: &Credentials) -> anyhow::Result<Self> {
        let tls =
            rustls::ClientConfig::builder_with_provider(dcflow_transfer::credentials::provider())
                .with_safe_default_protocol_versions()?
                .with_root_certificates(creds.roots.clone())
                .with_no_client_auth();
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("dcflow/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self { client })
    }

    /// One POST. The idempotency key is the same for every delivery of this event to this
    /// step (pnfsid, workflow, step), so a receiver can drop repeats.
    #[allow(clippy::too_many_arguments)]
    pub async fn post(
        &self,
        ctx: &Context,
        url: &url::Url,
        format: WebhookFormat,
        headers: &BTreeMap<String, Template>,
        token_file: Option<&std::path::Path>,
        timeout: Duration,
        idempotency_key: &str,
        event: &serde_json::Value,
    ) -> Result<(), StepError> {
        let data = serde_json::json!({ "event": event, "context": ctx.as_json() });
        let (body, content_type) = match format {
            WebhookFormat::Json => (data, "application/json"),
            WebhookFormat::CloudEvent => (
                serde_json::json!({
                    "specversion": "1.0",
                    "id": idempotency_key,
                    "source": format!("dcflow/{}", ctx.values.get("workflow").map_or("", String::as_str)),
                    "type": format!("org.dcache.{}", ctx.values.get("kind").map_or("event", String::as_str)),
                    "subject": ctx.values.get("path"),
                    "time": time::OffsetDateTime::now_utc()
                        .format(&time::format_description::well_known::Rfc3339)
                        .unwrap_or_default(),
                    "datacontenttype": "application/json",
                    "data": data,
                }),
                "application/cloudevents+json",
            ),
        };
        let mut req = self
            .client
            .post(url.clone())
            .timeout(timeout)
            .header("Content-Type", content_type)
            .header("Idempotency-Key", idempotency_key)
            .body(body.to_string());
        for (k, v) in headers {
            req = req.header(k.as_str(), ctx.render(v)?);
        }
        if let Some(path) = token_file {
            let token = std::fs::read_to_string(path).map_err(|e| {
                StepError::retry(format!("cannot read token file {}: {e}", path.display()))
            })?;
            let mut value =
                reqwest::header::HeaderValue::from_str(&format!("Bearer {}", token.trim()))
                    .map_err(|_| {
                        StepError::fatal(
                            "the webhook token holds characters not allowed in a header",
                        )
                    })?;
            value.set_sensitive(true);
            req = req.header(reqwest::header::AUTHORIZATION, value);
        }
        let shown = strip(url);
        let resp = req.send().await.map_err(|e| {
            let what = if e.is_timeout() {
                format!("no answer within {} s", timeout.as_secs())
            } else {
                // reqwest's message can hold the URL with its query: keep only the kind.
                format!("cannot reach it: {}", e.without_url())
            };
            StepError::retry(format!("webhook {shown}: {what}"))
        })?;
        let status = resp.status();
        if status.is_success() {
            info!(url = %shown, status = status.as_u16(), "WEBHOOK {shown} answered {status}");
            return Ok(());
        }
        let message = format!("webhook {shown} answered {status}");
        if status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408 {
            Err(StepError::retry(message))
        } else {
            Err(StepError::fatal(message))
        }
    }
}

/// A URL without credentials or query, for logs.
fn strip(url: &url::Url) -> String {
    let mut u = url.clone();
    let _ = u.set_password(None);
    let _ = u.set_username("");
    u.set_query(None);
    u.to_string()
}
