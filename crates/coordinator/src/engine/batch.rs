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

fn unreadable(e: &EngineError) -> bool {
    matches!(e, EngineError::State(s) if s.is_unreadable())
}

/// Why the engine stopped taking steps, once its state store failed in the middle of one.
#[derive(Debug, Default)]
pub(super) struct Halt {
    why: std::sync::OnceLock<String>,
    told: tokio::sync::Notify,
}

impl Engine {
    /// Runs `f` as one transaction of the state store, so that a coordinator killed in the
    /// middle of it keeps none of it: killed between an attempt's end and its outcome, it
    /// would know the attempt done and its build not, and build it again. Watchers and
    /// agents hear of what it did once it is stored. Inside a batch, `f` just runs.
    ///
    /// A step the store fails in (a full disk, an I/O error) is dropped whole, and the
    /// engine takes no step after it: its memory went on where the store did not, and
    /// acting on that would store a state no restart explains. The server then ends
    /// ([`Engine::halted`]) and, started again, goes on from the store.
    pub(super) fn atomically<T>(
        &self,
        inner: &mut Inner,
        f: impl FnOnce(&mut Inner) -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        if inner.batch.is_some() {
            return f(inner);
        }
        if let Some(why) = self.halt.why.get() {
            return Err(EngineError::Halted(why.clone()));
        }
        inner.db.begin_batch()?;
        inner.batch = Some(Vec::new());
        let out = f(inner);
        match out {
            // A row that does not decode (an older coordinator's) is that row's trouble,
            // not the store's: the step ends as any failed step did.
            Err(e @ (EngineError::State(_) | EngineError::Io(_))) if !unreadable(&e) => {
                inner.batch = None;
                if let Err(r) = inner.db.abandon_batch() {
                    tracing::error!("cannot drop the failed step's writes: {r}");
                }
                let why = format!("the state store failed in the middle of a step: {e}");
                Err(self.halt_with(inner, why))
            }
            out => match self.end_batch(inner) {
                Ok(()) => out,
                Err(e) => Err(self.halt_with(inner, format!("the state store lost a step: {e}"))),
            },
        }
    }

    /// Stops the engine for `why`: the store takes no write after (a step outside a batch
    /// fails too); the error to answer with.
    fn halt_with(&self, inner: &mut Inner, why: String) -> EngineError {
        tracing::error!(
            "{why}; the coordinator stops (started again, it goes on from its database)"
        );
        if let Err(e) = inner.db.freeze() {
            tracing::error!("cannot stop the state store's writes: {e}");
        }
        let _ = self.halt.why.set(why.clone());
        self.halt.told.notify_waiters();
        EngineError::Halted(why)
    }

    /// Waits until the engine stops taking steps (its state store failed in the middle of
    /// one), and says why; a server ends then, for its supervisor to start it again.
    pub async fn halted(&self) -> String {
        loop {
            let told = self.halt.told.notified();
            if let Some(why) = self.halt.why.get() {
                return why.clone();
            }
            told.await;
        }
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
