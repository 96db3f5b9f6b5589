//! One module per subcommand.

pub mod agents;
pub mod cancel;
pub mod local;
pub mod matrix;
pub mod runs;
pub mod submit;
