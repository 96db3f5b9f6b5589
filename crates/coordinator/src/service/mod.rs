//! The gRPC services: wire messages become domain types here (and only here), and engine
//! errors become `tonic::Status` in one place.

use crate::engine::{Engine, EngineError};
use crate::model::*;
use crate::upload::Uploads;
use nixfarm_core::limits::{self as lim, check_len, clip, truncate};
use nixfarm_proto::v1 as pb;
use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

mod agent;
mod run;
mod wire;
mod wire_agent;

pub use agent::{AgentSvc, FarmCacheAdvert};
pub use run::RunSvc;
pub use wire::source_to_wire;
use wire::*;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

impl From<EngineError> for Status {
    fn from(e: EngineError) -> Status {
        match &e {
            EngineError::Invalid(_) => Status::invalid_argument(e.to_string()),
            EngineError::NotFound(_) => Status::not_found(e.to_string()),
            EngineError::Busy(_) | EngineError::Full(_) => {
                Status::resource_exhausted(e.to_string())
            }
            EngineError::Conflict(_) => Status::already_exists(e.to_string()),
            EngineError::Denied(_) => Status::permission_denied(e.to_string()),
            EngineError::State(_) | EngineError::Io(_) => {
                tracing::error!("internal error: {e}");
                Status::internal(e.to_string())
            }
            EngineError::Halted(_) => Status::unavailable(e.to_string()),
        }
    }
}

/// A wire message that does not convert into a domain value.
#[derive(Debug, thiserror::Error)]
#[error("malformed message: {0}")]
pub struct WireError(String);

impl From<WireError> for Status {
    fn from(e: WireError) -> Status {
        Status::invalid_argument(e.to_string())
    }
}

impl From<lim::TooLong> for WireError {
    fn from(e: lim::TooLong) -> WireError {
        WireError(e.to_string())
    }
}
