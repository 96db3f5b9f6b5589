//! One build at a time per output path on this host. Two fixed-output derivations with one
//! hash (the same source fetched twice, or a copied hash) have one output path; when Nix
//! finds that path locked by another of its processes it polls, every five seconds. Waiting
//! here instead lets the second start the moment the first is done.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::OwnedMutexGuard;

#[derive(Default)]
pub(crate) struct OutputLocks {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// The locks of one build, released when dropped.
pub(crate) struct Held {
    _guards: Vec<OwnedMutexGuard<()>>,
}

impl OutputLocks {
    /// Waits until no other build here holds any of `outputs`, then holds them all (in
    /// sorted order, so two builds never wait on each other).
    pub(crate) async fn hold(&self, mut outputs: Vec<String>) -> Held {
        outputs.sort();
        outputs.dedup();
        let mut guards = Vec::new();
        for o in outputs {
            let lock = {
                let Ok(mut m) = self.locks.lock() else {
                    break;
                };
                // Forget locks nobody holds or waits for: the map stays as small as the
                // builds going on.
                m.retain(|_, l| Arc::strong_count(l) > 1);
                m.entry(o).or_default().clone()
            };
            guards.push(lock.lock_owned().await);
        }
        Held { _guards: guards }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_second_build_of_the_same_output_waits_for_the_first() {
        let locks = Arc::new(OutputLocks::default());
        let first = locks.hold(vec!["/nix/store/x-source".into()]).await;
        let l2 = locks.clone();
        let second = tokio::spawn(async move { l2.hold(vec!["/nix/store/x-source".into()]).await });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!second.is_finished(), "the second must wait");
        // Another output does not wait.
        let _other = locks.hold(vec!["/nix/store/y-other".into()]).await;
        drop(first);
        let _second = second.await.unwrap();
    }
}
