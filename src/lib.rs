//! edgesync: EdgeNode objects replicated head ⇄ edge as Automerge documents over QUIC with
//! mutual TLS, cached in SQLite, and written on each edge as kubelet static pod manifests.
#![forbid(unsafe_code)]

pub mod cli;
pub mod clock;
pub mod commands;
pub mod config;
pub mod control;
pub mod crd;
pub mod daemon;
pub mod dev;
pub mod edge;
pub mod fsutil;
pub mod head;
pub mod input;
pub mod key;
pub mod link;
pub mod metrics;
pub mod model;
pub mod node;
pub mod registry;
pub mod runtime;
pub mod store;
pub mod sync;
pub mod transport;
pub mod version;
