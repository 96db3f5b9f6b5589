//! Where a build's outputs go and where its check reads them: the run's cache, or, for
//! cross-checked builds whose outputs are held out of it until checked, the farm cache, the
//! store the agents share, or the builder's own store (the check then builds from scratch).

use super::assigned::Hold as HoldOutputs;

/// A place outputs travel through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Place {
    /// The run's cache (`--cache`, or the farm cache when the run has none of its own).
    RunCache,
    /// The coordinator's farm cache, apart from the run's own cache.
    FarmCache,
    /// Nowhere else: this store, which the agents share.
    ThisStore,
    /// Nowhere: the builder's own store, which no other agent reads. The build reports its
    /// outputs' NAR hashes; the check builds the derivation again from scratch and compares.
    BuilderStore,
}

/// What the run's cache is, as this agent sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RunCache {
    /// None at all: the agents share one store.
    None,
    /// The farm cache itself, which only agents read.
    Farm,
    /// A cache of the run's own (Cachix, HTTP, file://), which users download from.
    Own,
}

#[derive(Debug, PartialEq, Eq)]
pub(super) struct Route {
    /// Where a build pushes its outputs.
    pub build_to: Place,
    /// Where a check reads the outputs it checks.
    pub check_from: Place,
    /// A check that agrees pushes its own copy to the run's cache.
    pub publish: bool,
}

/// The route for a job that says `hold` (a value this agent does not know came as the farm
/// cache: never the run's cache), given the run's cache and whether this agent
/// has a farm cache. An error when outputs are to wait in a farm cache it does not have.
pub(super) fn route(
    hold: HoldOutputs,
    run_cache: RunCache,
    has_farm: bool,
) -> Result<Route, &'static str> {
    let plain = |at| Route {
        build_to: at,
        check_from: at,
        publish: false,
    };
    match (run_cache, hold) {
        (RunCache::None, _) => Ok(plain(Place::ThisStore)),
        // Nothing to hold them out of.
        (RunCache::Farm, _) | (RunCache::Own, HoldOutputs::None) => Ok(plain(Place::RunCache)),
        (RunCache::Own, HoldOutputs::SharedStore) => Ok(Route {
            publish: true,
            ..plain(Place::ThisStore)
        }),
        (RunCache::Own, HoldOutputs::BuilderStore) => Ok(Route {
            publish: true,
            ..plain(Place::BuilderStore)
        }),
        (RunCache::Own, HoldOutputs::FarmCache) if has_farm => Ok(Route {
            publish: true,
            ..plain(Place::FarmCache)
        }),
        (RunCache::Own, HoldOutputs::FarmCache) => {
            Err("this agent has no farm cache (is the coordinator's turned off?)")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_outputs_never_go_to_the_runs_own_cache_before_their_check() {
        use HoldOutputs as H;
        use Place::{
            BuilderStore as Builder, FarmCache as Farm, RunCache as Run, ThisStore as Here,
        };
        let way = |at, publish| {
            Ok(Route {
                build_to: at,
                check_from: at,
                publish,
            })
        };
        // Not held: the run's cache both ways (or this store, without one).
        assert_eq!(route(H::None, RunCache::Own, true), way(Run, false));
        assert_eq!(route(H::FarmCache, RunCache::None, false), way(Here, false));
        // The run's cache is the farm cache: nothing to hold them out of.
        assert_eq!(route(H::FarmCache, RunCache::Farm, true), way(Run, false));
        // Held: in the farm cache or this store, and the check publishes.
        assert_eq!(route(H::FarmCache, RunCache::Own, true), way(Farm, true));
        assert_eq!(route(H::SharedStore, RunCache::Own, false), way(Here, true));
        // Held in the builder's store (no farm cache), which needs none.
        assert_eq!(
            route(H::BuilderStore, RunCache::Own, false),
            way(Builder, true)
        );
        assert_eq!(
            route(H::BuilderStore, RunCache::Own, true),
            way(Builder, true)
        );
        // Without a cache of the run's own, nothing is held, whatever the job says.
        assert_eq!(
            route(H::BuilderStore, RunCache::None, false),
            way(Here, false)
        );
        assert_eq!(
            route(H::BuilderStore, RunCache::Farm, true),
            way(Run, false)
        );
        // No farm cache to hold them in: refused. A way this agent does not know is taken
        // as the farm cache.
        assert!(route(H::FarmCache, RunCache::Own, false).is_err());
        let unknown = HoldOutputs::from(99);
        assert!(route(unknown, RunCache::Own, false).is_err());
        assert_eq!(route(unknown, RunCache::Own, true), way(Farm, true));
    }
}
