//! The nixfarm coordinator: durable run state in SQLite, the derivation scheduler, and the
//! gRPC services agents and the CLI talk to. It needs no Nix itself.

pub mod clock;
pub mod config;
pub mod credentials;
pub mod db;
mod db_agents;
mod db_attempts;
mod db_checks;
mod db_opinions;
mod db_repo;
mod db_schema;
mod db_stages;
mod db_times;
pub mod engine;
pub mod farm_cache;
pub mod farm_tokens;
pub mod http_serve;
pub mod interceptor;
pub mod limit;
pub mod model;
mod model_agent;
mod model_eval;
pub mod reloads;
pub mod revoked;
pub mod scheduler;
mod scheduler_class;
pub mod server;
pub mod service;
pub mod state;
pub mod state_lock;
pub mod tls_listener;
pub mod trees;
pub mod upload;
pub mod watched;
pub mod web;

pub use config::Config;
pub use engine::{Engine, EngineError, EngineOptions, UploadClaim};
