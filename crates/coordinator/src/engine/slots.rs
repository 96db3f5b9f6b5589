//! An agent's running attempts by the kind of slot each holds, counted as they come and go:
//! dispatch asks for every agent on every message whether a slot is free.

use std::collections::HashMap;

/// The kind of slot an attempt holds on its agent. Each kind is counted against its own
/// limit: builds against `max_jobs`, fetches (fixed-output derivations) against as many
/// again, evaluation against `eval::eval_slots`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Slot {
    Build,
    Fetch,
    Eval,
}

#[derive(Default)]
pub(super) struct Running {
    held: HashMap<String, Slot>,
    fetches: usize,
    evals: usize,
}

impl Running {
    /// Holds `attempt` in a slot of kind `slot`; an attempt held already keeps its slot.
    pub(super) fn insert(&mut self, attempt: String, slot: Slot) {
        if self.held.contains_key(&attempt) {
            return;
        }
        self.count(slot, 1);
        self.held.insert(attempt, slot);
    }

    /// Frees `attempt`'s slot, if it holds one.
    pub(super) fn remove(&mut self, attempt: &str) {
        if let Some(slot) = self.held.remove(attempt) {
            self.count(slot, -1);
        }
    }

    fn count(&mut self, slot: Slot, by: isize) {
        let n = match slot {
            Slot::Build => return,
            Slot::Fetch => &mut self.fetches,
            Slot::Eval => &mut self.evals,
        };
        *n = n.saturating_add_signed(by);
    }

    pub(super) fn len(&self) -> usize {
        self.held.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &String> {
        self.held.keys()
    }

    /// Attempts in build slots.
    pub(super) fn builds(&self) -> usize {
        self.held.len() - self.fetches - self.evals
    }

    /// Attempts in fetch slots.
    pub(super) fn fetches(&self) -> usize {
        self.fetches
    }

    /// Attempts in evaluation slots.
    pub(super) fn evals(&self) -> usize {
        self.evals
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_is_counted_once_and_freed_once() {
        let mut r = Running::default();
        r.insert("a".into(), Slot::Build);
        r.insert("f".into(), Slot::Fetch);
        r.insert("e".into(), Slot::Eval);
        // Held already: a duplicate changes nothing, whatever kind it claims.
        r.insert("e".into(), Slot::Build);
        assert_eq!((r.len(), r.builds(), r.fetches(), r.evals()), (3, 1, 1, 1));
        r.remove("e");
        r.remove("e");
        r.remove("nothing");
        assert_eq!((r.len(), r.builds(), r.fetches(), r.evals()), (2, 1, 1, 0));
        r.remove("f");
        r.remove("a");
        assert!(r.is_empty());
        assert_eq!((r.builds(), r.fetches(), r.evals()), (0, 0, 0));
    }
}
