//! The `catalog` step: the event's file as one row of the catalog table (upserted, so a
//! redelivered event updates its row).

use std::path::Path;

use dcflow_core::workflow::EventKind;

use super::StepError;
use crate::catalog::Entry;
use crate::executor::Run;
use crate::pipeline::Pipeline;

impl Pipeline {
    /// The row for this event, from what the earlier steps left in the context.
    pub(crate) fn catalog_entry(&self, run: &Run<'_>) -> Entry {
        let (upload, ctx) = (run.upload, &run.ctx);
        let status = match upload.kind {
            EventKind::Upload if run.verified_copy => "present",
            EventKind::Upload => "announced",
            EventKind::Remove => "removed",
            EventKind::Restore => "restored",
            EventKind::Store => "stored",
        };
        Entry {
            workflow: run.wf.name.clone(),
            path: upload.billing_path.clone(),
            local_path: ctx.values.get("local_path").cloned(),
            size: ctx.values.get("size").and_then(|s| s.parse().ok()),
            checksum: ctx
                .values
                .get("checksum")
                .cloned()
                .filter(|c| !c.is_empty()),
            pnfsid: upload.pnfsid.to_string(),
            status: status.into(),
            first_seen: String::new(),
            updated: String::new(),
        }
    }

    pub(crate) async fn catalog_step(
        &self,
        database: &Path,
        entry: &Entry,
    ) -> Result<(), StepError> {
        let catalog = self.catalogs.get(database).expect("opened at start");
        catalog
            .upsert(entry.clone())
            .await
            .map_err(|e| StepError::retry(format!("catalog {}: {e:#}", database.display())))
    }
}
