//! nixfarm's domain types: statuses, store paths, run events, the readiness report and its renderings, source snapshots.
//!
//! Nothing here does I/O beyond reading and writing the snapshot files it is handed;
//! the coordinator, the agent and the CLI share these types so that they agree on meaning.

pub mod cache_url;
pub mod config_text;
pub mod entry;
pub mod events;
pub mod fit;
pub mod flakeref;
pub mod hash;
pub mod limits;
pub mod report;
mod report_ci;
pub mod report_matrix;
mod report_table;
mod tree_remove;
pub use report_table::TableWidth;
pub mod snapshot;
pub mod status;
pub mod store_path;
pub mod stored_or_empty;

pub use events::RunEvent;
pub use hash::Sri;
pub use report::{PackageReport, Report, Summary};
pub use status::{BuildOutcome, PackageStatus, RunState, Smoke};
pub use store_path::{OutputPath, StorePath, StorePathError};

/// Whether a source revision pins a commit (a full hex commit id), as opposed to a
/// branch or tag name that moves.
pub fn rev_is_pinned(rev: &str) -> bool {
    (rev.len() == 40 || rev.len() == 64) && rev.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinned_revisions() {
        assert!(rev_is_pinned("0123456789abcdef0123456789abcdef01234567"));
        assert!(!rev_is_pinned("main"));
        assert!(!rev_is_pinned("HEAD"));
        assert!(!rev_is_pinned("v1.2.3"));
        assert!(!rev_is_pinned("0123456789abcdef"));
    }
}
