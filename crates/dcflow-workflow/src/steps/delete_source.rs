//! The `delete-source` step: removes the dCache file once the local copy has been checked
//! again against dCache's size and checksum (a workflow resumed at this step, or a local
//! file changed since the copy, keeps its source).

use std::path::PathBuf;

use dcflow_core::Mapped;
use dcflow_transfer::LocalCopy;
use tracing::info;

use super::{Context as StepContext, StepError};
use crate::pipeline::Pipeline;

impl Pipeline {
    pub(crate) async fn delete_source_step(
        &self,
        mapped: &Mapped,
        ctx: &StepContext,
    ) -> Result<(), StepError> {
        // The copy is checked again now, not trusted from a record.
        let local = ctx
            .values
            .get("local_path")
            .map(PathBuf::from)
            .ok_or_else(|| {
                StepError::fatal("no local copy in this workflow: the source is kept")
            })?;
        match self.engine.check_local(&mapped.source_url, &local).await {
            Ok(LocalCopy::Matches(_)) => {}
            Ok(LocalCopy::SourceGone) => {
                info!(source = %mapped.source_url, "DELETE_SOURCE {} already gone", mapped.source_url);
                return Ok(());
            }
            Ok(LocalCopy::Differs(why)) => {
                return Err(StepError::fatal(format!(
                    "the local copy {} does not match dCache's file ({why}): the source is kept",
                    local.display()
                )))
            }
            Err(e) => {
                return Err(StepError::transfer(
                    "checking the local copy before deleting: ",
                    &e,
                ))
            }
        }
        match self.engine.delete(&mapped.source_url).await {
            Ok(true) => {
                info!(source = %mapped.source_url, "DELETE_SOURCE {} deleted from dCache", mapped.source_url);
                Ok(())
            }
            Ok(false) => {
                info!(source = %mapped.source_url, "DELETE_SOURCE {} already gone", mapped.source_url);
                Ok(())
            }
            Err(e) => Err(StepError::transfer("", &e)),
        }
    }
}
