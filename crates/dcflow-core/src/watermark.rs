//! Contiguous commit watermarks: an offset (or an SSE event id) may be acknowledged only when
//! every earlier one of its partition has finished, whatever order the files finish in.
//!
//! A consumer hands out offsets of a partition in increasing order ([`Watermarks::start`]);
//! work finishes in any order ([`Watermarks::finish`]). The committable position of a
//! partition is the smallest offset still in flight, or one past the highest offset seen when
//! nothing is in flight (Kafka commits the *next* offset to read). Gaps between offsets
//! (compaction, transaction markers) need no special care.
//!
//! When a partition is revoked its state is dropped; a [`Ticket`] carries the generation of
//! its assignment, so work that finishes after a revocation (or after the partition came back)
//! can never move the new owner's watermark.

use std::collections::{BTreeSet, HashMap};

/// One in-flight offset, to be handed back to [`Watermarks::finish`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Ticket {
    pub partition: i32,
    pub offset: i64,
    generation: u64,
}

#[derive(Debug, Default)]
struct Partition {
    generation: u64,
    in_flight: BTreeSet<i64>,
    highest_seen: Option<i64>,
    committed: Option<i64>,
}

impl Partition {
    fn committable(&self) -> Option<i64> {
        match self.in_flight.first() {
            Some(&lowest) => Some(lowest),
            None => self.highest_seen.map(|h| h + 1),
        }
    }
}

/// Watermarks of all partitions of one topic that this consumer owns.
#[derive(Debug, Default)]
pub struct Watermarks {
    partitions: HashMap<i32, Partition>,
    next_generation: u64,
}

impl Watermarks {
    /// The partition is (re)assigned to us: a new generation starts.
    pub fn assign(&mut self, partition: i32) {
        self.next_generation += 1;
        self.partitions.insert(
            partition,
            Partition {
                generation: self.next_generation,
                ..Default::default()
            },
        );
    }

    /// The partition was revoked: forget it; late finishes of its tickets are ignored.
    pub fn revoke(&mut self, partition: i32) {
        self.partitions.remove(&partition);
    }

    /// Registers an offset handed to the pipeline. Offsets of a partition must be started in
    /// increasing order. Returns `None` for a partition we do not own.
    pub fn start(&mut self, partition: i32, offset: i64) -> Option<Ticket> {
        let p = self.partitions.get_mut(&partition)?;
        debug_assert!(
            p.highest_seen.is_none_or(|h| offset > h),
            "offsets start in order"
        );
        p.in_flight.insert(offset);
        p.highest_seen = Some(p.highest_seen.map_or(offset, |h| h.max(offset)));
        Some(Ticket {
            partition,
            offset,
            generation: p.generation,
        })
    }

    /// An offset handled at once (dismissed unread): the same as [`Watermarks::start`]
    /// followed by [`Watermarks::finish`], without a ticket. Returns false for a partition we
    /// do not own.
    pub fn pass(&mut self, partition: i32, offset: i64) -> bool {
        let Some(p) = self.partitions.get_mut(&partition) else {
            return false;
        };
        debug_assert!(
            p.highest_seen.is_none_or(|h| offset > h),
            "offsets start in order"
        );
        p.highest_seen = Some(p.highest_seen.map_or(offset, |h| h.max(offset)));
        true
    }

    /// Marks a ticket's work finished (done, skipped, or failed and recorded). Returns false
    /// when the ticket belongs to an assignment that no longer exists.
    pub fn finish(&mut self, ticket: &Ticket) -> bool {
        match self.partitions.get_mut(&ticket.partition) {
            Some(p) if p.generation == ticket.generation => p.in_flight.remove(&ticket.offset),
            _ => false,
        }
    }

    /// Positions that advanced past the last confirmed commit, as (partition, next offset to
    /// read): what to commit now. Nothing is marked here: a position stays pending until
    /// [`Watermarks::confirm`] says the broker (or the state file) has it, so a commit that
    /// failed, or an asynchronous one whose answer never came, is sent again.
    pub fn pending_commits(&self) -> Vec<(i32, i64)> {
        let mut out: Vec<(i32, i64)> = self
            .partitions
            .iter()
            .filter_map(|(&partition, p)| {
                let pos = p.committable()?;
                p.committed
                    .is_none_or(|c| pos > c)
                    .then_some((partition, pos))
            })
            .collect();
        out.sort_unstable();
        out
    }

    /// A commit of `offset` for `partition` succeeded. Confirmations of a partition no longer
    /// owned, or older than one already confirmed, change nothing.
    pub fn confirm(&mut self, partition: i32, offset: i64) {
        if let Some(p) = self.partitions.get_mut(&partition) {
            if p.committed.is_none_or(|c| offset > c) {
                p.committed = Some(offset);
            }
        }
    }

    /// The assignment a partition is owned under now, if it is: a new one each time the
    /// partition is (re)assigned. A message fetched under one assignment must not be taken
    /// under the next (the new assignment fetches again from the committed offset).
    pub fn generation(&self, partition: i32) -> Option<u64> {
        self.partitions.get(&partition).map(|p| p.generation)
    }

    /// The offset after the highest one seen in a partition under its current assignment
    /// (`None`: nothing seen yet, or not owned).
    pub fn next_to_read(&self, partition: i32) -> Option<i64> {
        self.partitions
            .get(&partition)
            .and_then(|p| p.highest_seen)
            .map(|h| h + 1)
    }

    /// The last commit of a partition that the broker confirmed in this process, if any.
    pub fn confirmed(&self, partition: i32) -> Option<i64> {
        self.partitions.get(&partition).and_then(|p| p.committed)
    }

    /// Partitions owned now (assigned and not revoked).
    pub fn owned(&self) -> impl Iterator<Item = i32> + '_ {
        self.partitions.keys().copied()
    }

    /// Offsets in flight across all partitions.
    pub fn in_flight(&self) -> usize {
        self.partitions.values().map(|p| p.in_flight.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn each_assignment_of_a_partition_is_a_new_generation() {
        let mut w = super::Watermarks::default();
        assert_eq!(w.generation(3), None);
        w.assign(3);
        let first = w.generation(3).unwrap();
        w.assign(4);
        assert_eq!(w.generation(3), Some(first), "assigning another partition");
        w.revoke(3);
        assert_eq!(w.generation(3), None);
        w.assign(3);
        assert_ne!(w.generation(3), Some(first));
    }

    #[test]
    fn next_to_read_follows_what_was_seen_under_the_current_assignment() {
        let mut w = super::Watermarks::default();
        w.assign(0);
        assert_eq!(w.next_to_read(0), None, "nothing seen yet");
        w.pass(0, 41);
        let t = w.start(0, 42).unwrap();
        assert_eq!(w.next_to_read(0), Some(43), "seen, even if not finished");
        w.finish(&t);
        w.revoke(0);
        assert_eq!(w.next_to_read(0), None);
        w.assign(0);
        assert_eq!(w.next_to_read(0), None, "a new assignment starts afresh");
    }

    use super::*;
    use rand::seq::SliceRandom;

    /// Issue 14, item 12: a position was marked committed when it was handed out, before the
    /// (asynchronous) commit succeeded; a failed commit was then never sent again, not even by
    /// the final synchronous one.
    #[test]
    fn a_commit_that_was_not_confirmed_is_sent_again() {
        let mut w = Watermarks::default();
        w.assign(0);
        let t = w.start(0, 5).unwrap();
        w.finish(&t);
        assert_eq!(w.pending_commits(), vec![(0, 6)]);
        // The commit failed (or its answer never came): the next one sends it again.
        assert_eq!(w.pending_commits(), vec![(0, 6)], "still pending");
        w.confirm(0, 6);
        assert_eq!(w.pending_commits(), vec![], "confirmed");
        w.confirm(0, 3);
        let t = w.start(0, 6).unwrap();
        w.finish(&t);
        assert_eq!(
            w.pending_commits(),
            vec![(0, 7)],
            "an older confirmation changes nothing"
        );
    }

    /// Commits as a source makes them: pending, then confirmed at once.
    fn take_commits(w: &mut Watermarks) -> Vec<(i32, i64)> {
        let out = w.pending_commits();
        for &(p, o) in &out {
            w.confirm(p, o);
        }
        out
    }

    #[test]
    fn commits_only_a_contiguous_prefix() {
        let mut w = Watermarks::default();
        w.assign(0);
        let t: Vec<Ticket> = (10..15).map(|o| w.start(0, o).unwrap()).collect();
        assert!(
            take_commits(&mut w).iter().all(|&(_, pos)| pos == 10),
            "nothing finished yet"
        );
        w.finish(&t[2]);
        w.finish(&t[1]);
        assert_eq!(take_commits(&mut w), vec![], "10 still in flight");
        w.finish(&t[0]);
        assert_eq!(take_commits(&mut w), vec![(0, 13)]);
        w.finish(&t[4]);
        assert_eq!(take_commits(&mut w), vec![], "13 still in flight");
        w.finish(&t[3]);
        assert_eq!(take_commits(&mut w), vec![(0, 15)]);
        assert_eq!(take_commits(&mut w), vec![], "no repeat");
    }

    #[test]
    fn passed_offsets_advance_only_behind_unfinished_work() {
        let mut w = Watermarks::default();
        w.assign(0);
        assert!(w.pass(0, 0));
        assert!(w.pass(0, 1));
        assert_eq!(take_commits(&mut w), vec![(0, 2)]);
        let held = w.start(0, 2).unwrap();
        assert!(w.pass(0, 3));
        assert!(w.pass(0, 4));
        assert_eq!(take_commits(&mut w), vec![], "2 still in flight");
        w.finish(&held);
        assert_eq!(take_commits(&mut w), vec![(0, 5)]);
        assert!(!w.pass(7, 0), "not our partition");
        assert_eq!(w.in_flight(), 0);
    }

    #[test]
    fn gaps_between_offsets_do_not_block() {
        let mut w = Watermarks::default();
        w.assign(3);
        let a = w.start(3, 100).unwrap();
        let b = w.start(3, 250).unwrap();
        w.finish(&b);
        assert_eq!(take_commits(&mut w), vec![(3, 100)]);
        w.finish(&a);
        assert_eq!(take_commits(&mut w), vec![(3, 251)]);
    }

    #[test]
    fn revoked_work_never_moves_the_new_owner() {
        let mut w = Watermarks::default();
        w.assign(1);
        let old = w.start(1, 5).unwrap();
        w.revoke(1);
        assert_eq!(w.start(1, 6), None, "not ours any more");
        assert!(!w.finish(&old));
        w.assign(1);
        let new = w.start(1, 5).unwrap();
        assert!(
            !w.finish(&old),
            "a ticket of the previous assignment is ignored"
        );
        assert_eq!(take_commits(&mut w), vec![(1, 5)]);
        assert!(w.finish(&new));
        assert_eq!(take_commits(&mut w), vec![(1, 6)]);
    }

    #[test]
    fn random_finish_orders_never_commit_past_unfinished_work() {
        let mut rng = rand::thread_rng();
        for _ in 0..200 {
            let mut w = Watermarks::default();
            w.assign(0);
            let mut tickets: Vec<Ticket> = (0..50).map(|o| w.start(0, o).unwrap()).collect();
            tickets.shuffle(&mut rng);
            let mut finished = BTreeSet::new();
            let mut last = 0;
            for t in &tickets {
                w.finish(t);
                finished.insert(t.offset);
                for (_, pos) in take_commits(&mut w) {
                    assert!(
                        (0..pos).all(|o| finished.contains(&o)),
                        "committed {pos} past unfinished work"
                    );
                    assert!(pos > last || pos == 0);
                    last = pos;
                }
            }
            assert_eq!(last, 50);
            assert_eq!(w.in_flight(), 0);
        }
    }
}
