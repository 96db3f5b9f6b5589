//! Engine steps as transactions: what a step stores lands together (or, the process dying
//! first, not at all), and what it tells watchers and agents goes out once it is stored.

use super::*;

/// What a batch tells others once it commits: nobody acts on what a crash would undo.
pub(super) enum Deferred {
    Event(RunEvent),
    ToAgent(mpsc::UnboundedSender<ToAgent>, ToAgent),
}

impl Deferred {
    fn deliver(self, events: &broadcast::Sender<RunEvent>) {
        match self {
            Deferred::Event(e) => {
                let _ = events.send(e);
            }
            Deferred::ToAgent(tx, msg) => {
                let _ = tx.send(msg);
            }
        }
    }
}

impl Inner {
    /// Sends `msg` to an agent's stream; inside a batch, once it commits.
    pub(super) fn send(&mut self, tx: mpsc::UnboundedSender<ToAgent>, msg: ToAgent) {
        match self.batch.as_mut() {
            Some(held) => held.push(Deferred::ToAgent(tx, msg)),
            None => {
                let _ = tx.send(msg);
            }
        }
    }
}

impl Engine {
    /// Runs `f` as one transaction of the state store, so that a coordinator killed in the
    /// middle of it keeps none of it: killed between an attempt's end and its outcome, it
    /// would know the attempt done and its build not, and build it again. Watchers and
    /// agents hear of what it did once it is stored. A step that fails stores what it
    /// stored (memory went on with it), as before batches. Inside a batch, `f` just runs.
    pub(super) fn atomically<T>(
        &self,
        inner: &mut Inner,
        f: impl FnOnce(&mut Inner) -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        if inner.batch.is_some() {
            return f(inner);
        }
        inner.db.begin_batch()?;
        inner.batch = Some(Vec::new());
        let out = f(inner);
        self.end_batch(inner)?;
        out
    }

    /// Commits the open batch, then tells what it held back.
    pub(super) fn end_batch(&self, inner: &mut Inner) -> Result<(), EngineError> {
        let held = inner.batch.take().unwrap_or_default();
        inner.db.end_batch()?;
        for d in held {
            d.deliver(&self.events);
        }
        Ok(())
    }
}
