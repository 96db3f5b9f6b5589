//! Running real Nix as a child process (argv, never a shell string) and parsing what Nix
//! and Lix print, across the versions users run.

pub mod aterm;
mod build_hook;
mod captured;
mod daemon;
mod daemon_cache;
mod daemon_pool;
mod daemon_query;
pub mod derivation;
pub mod entry;
mod eval;
pub mod flake_check;
pub mod flake_inputs;
pub mod isolation;
pub mod messages;
mod path_info;
mod quote;
pub mod room;
pub mod runner;
mod store_query;
mod tail;
pub mod text_path;
mod worker_protocol;

pub use captured::let_stopping_children_finish;
pub use derivation::Derivation;
/// Nix's hash encodings are a domain type too (a report's hashes): in `nixfarm-core`.
pub use nixfarm_core::hash;
/// Store paths are a domain type (they cross events and reports); they live in `nixfarm-core`.
pub use nixfarm_core::store_path;
pub use runner::{AttrInfo, BuildOptions, BuildRun, ListedAndEvaluated, Nix, NixError};
pub use store_path::{OutputPath, StorePath, StorePathError};
