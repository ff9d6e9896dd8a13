//! The uploads seen: those in flight (always kept) and the most recently finished (bounded),
//! for merging what one upload announces twice. Kept apart from admission so that the
//! pipeline, which owns the map, and admission, which reads it, do not import each other.

use std::collections::HashMap;

use dcflow_core::workflow::EventKind;
use dcflow_core::PnfsId;
use tokio::sync::watch;

#[derive(Debug, Clone)]
pub(crate) enum Seen {
    /// Being copied; the receiver completes when that copy ends.
    InFlight(watch::Receiver<bool>),
    Done,
    Failed,
}

/// How many finished uploads are remembered for merging duplicates; older ones are
/// forgotten first (a forgotten duplicate costs a HEAD and a local checksum instead).
pub(crate) const REMEMBER_FINISHED: usize = 1_000_000;

/// Uploads in flight (always kept) and the most recently finished ones (bounded), so that a
/// daemon running for months does not grow with every file it ever copied.
/// Events are merged per kind and pnfsid: a remove of a file is not its upload. A message that
/// names a path the file appears at only after its commit (dCache #5285) is apart from one
/// that names the committed file: when the first one's 404 retries run out, the later SRM
/// `putDone` or door message, the one that can work, still gets its own run.
pub(crate) type SeenKey = (EventKind, PnfsId, bool);

pub(crate) struct SeenMap {
    map: HashMap<SeenKey, Seen>,
    finished: std::collections::VecDeque<SeenKey>,
    limit: usize,
}

impl SeenMap {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            map: HashMap::new(),
            finished: Default::default(),
            limit,
        }
    }

    pub(crate) fn get(&self, key: &SeenKey) -> Option<&Seen> {
        self.map.get(key)
    }

    pub(crate) fn start(&mut self, key: &SeenKey, running: watch::Receiver<bool>) {
        self.map.insert(key.clone(), Seen::InFlight(running));
    }

    pub(crate) fn finish(&mut self, key: &SeenKey, state: Seen) {
        self.map.insert(key.clone(), state);
        self.finished.push_back(key.clone());
        while self.finished.len() > self.limit {
            let Some(old) = self.finished.pop_front() else {
                break;
            };
            if !matches!(self.map.get(&old), Some(Seen::InFlight(_))) {
                self.map.remove(&old);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finished_uploads_are_remembered_up_to_a_bound() {
        let id = |n: u32| {
            (
                EventKind::Upload,
                PnfsId::parse(&format!("{n:036X}")).unwrap(),
                false,
            )
        };
        let mut seen = SeenMap::new(3);
        let (_running, rx) = watch::channel(false);
        seen.start(&id(0), rx);
        for n in 1..=5 {
            seen.finish(&id(n), Seen::Done);
        }
        assert!(
            matches!(seen.get(&id(0)), Some(Seen::InFlight(_))),
            "in flight is never forgotten"
        );
        assert!(
            seen.get(&id(1)).is_none() && seen.get(&id(2)).is_none(),
            "oldest forgotten"
        );
        assert!((3..=5).all(|n| seen.get(&id(n)).is_some()));
        assert_eq!(seen.map.len(), 4);
    }
}
