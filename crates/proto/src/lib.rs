//! Generated gRPC code for the `nixfarm.v1` API, kept apart from domain types.
#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("nixfarm.v1");
}
