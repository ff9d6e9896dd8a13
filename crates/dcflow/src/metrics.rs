//! The HTTP endpoint (`[metrics] address`) that serves a running dcflow's counters and live
//! activity (kept by `dcflow_workflow::stats`):
//!
//! ```text
//! /metrics       Prometheus text format (a Grafana dashboard in contrib/)
//! /healthz       200 while the process serves requests (liveness)
//! /readyz        200 once the source is connected (partitions assigned) and no upstream
//!                (brokers, frontend, door) has been unreachable longer than `outagegrace`
//! /              the status page: transfers in flight, recent results, throughput, lag
//! /status.json   what the page and `dcflow status` show
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use dcflow_workflow::stats::{Stats, SAMPLE_EVERY};
use dcflow_workflow::Pipeline;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use tracing::{info, warn};

use crate::daemon::Daemon;

const PAGE: &str = include_str!("status.html");

/// Serves the endpoint until the daemon exits (after the drain: `/readyz` and the status page
/// stay up while transfers finish); also samples the throughput every 10 s.
pub async fn serve(address: SocketAddr, pipeline: Arc<Pipeline>, daemon: &Daemon) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("listening on [metrics] address {address}"))?;
    info!(%address, "metrics, health and status at http://{address}/");
    let sampler = pipeline.clone();
    let stop = daemon.exit_token();
    daemon.spawn(async move {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        loop {
            tokio::select! {
                _ = tick.tick() => sampler.activity.sample(Stats::get(&sampler.stats.bytes)),
                _ = stop.cancelled() => break,
            }
        }
    });
    let shutdown = daemon.exit_token();
    let connections = daemon.tracker().clone();
    daemon.spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        warn!(error = %e, "status endpoint: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = shutdown.cancelled() => break,
            };
            let pipeline = pipeline.clone();
            let shutdown = shutdown.clone();
            connections.spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let pipeline = pipeline.clone();
                    async move { Ok::<_, Infallible>(route(&req, &pipeline)) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                tokio::select! {
                    _ = conn => {}
                    _ = shutdown.cancelled() => {}
                }
            });
        }
    });
    Ok(())
}

fn route(req: &Request<Incoming>, pipeline: &Pipeline) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, kind: &str, body: String| {
        Response::builder()
            .status(status)
            .header("Content-Type", kind)
            .header("Cache-Control", "no-store")
            .body(Full::new(Bytes::from(body)))
            .expect("valid response")
    };
    match req.uri().path() {
        // prometheus-client writes the OpenMetrics text format (`# EOF`, `_total` on
        // counters only): said as such, Prometheus parses it as such.
        "/metrics" => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            pipeline.encode_metrics(),
        ),
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" if pipeline.halted().is_some() => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            format!(
                "not ready: stopped, an outcome could not be recorded: {}\n",
                pipeline.halted().unwrap_or_default()
            ),
        ),
        "/readyz" if pipeline.activity.is_ready() => match pipeline.health.outages() {
            outages if outages.is_empty() => reply(StatusCode::OK, "text/plain", "ready\n".into()),
            outages => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {}\n", outages.join("; ")),
            ),
        },
        "/readyz" => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready: the source is not connected yet\n".into(),
        ),
        "/status.json" => reply(
            StatusCode::OK,
            "application/json",
            pipeline.status().to_string(),
        ),
        "/" | "/status" => reply(StatusCode::OK, "text/html; charset=utf-8", PAGE.into()),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}
