//! `dcflow replay`: every billing message of a JSONL file (or stdin) through the pipeline.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use dcflow_workflow::{Batch, Pipeline, Summary};
use tokio::io::{AsyncBufReadExt, BufReader};

use super::{finish_batch, load_pipeline, Failure};

/// Reads `input` (`-` = stdin) line by line; each line is one billing message.
pub async fn replay(pipeline: Arc<Pipeline>, input: &Path) -> Result<Summary> {
    let reader: Box<dyn tokio::io::AsyncRead + Unpin + Send> = if input == Path::new("-") {
        Box::new(tokio::io::stdin())
    } else {
        Box::new(
            tokio::fs::File::open(input)
                .await
                .with_context(|| format!("cannot open {}", input.display()))?,
        )
    };
    // Bytes, not strings: a line that is not UTF-8 is a malformed message, not a fatal error.
    let mut lines = BufReader::with_capacity(1 << 20, reader).split(b'\n');
    let mut batch = Batch::new(pipeline);
    let mut lineno = 0u64;
    while let Some(line) = lines
        .next_segment()
        .await
        .with_context(|| format!("reading {}", input.display()))?
    {
        lineno += 1;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        batch.push(&line, &format!("line {lineno}")).await?;
    }
    batch.finish().await
}

/// `dcflow replay`.
pub async fn command(config: &Path, events: &Path) -> Result<(), Failure> {
    let (_, pipeline) = load_pipeline(config, None).await?;
    finish_batch(replay(pipeline.clone(), events).await, &pipeline)
}
