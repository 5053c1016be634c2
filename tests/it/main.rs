//! Integration tests: the built binary as real head and edge processes on loopback, QUIC with
//! mutual TLS, SQLite on disk, and a UDP relay that cuts and degrades the link.
//!
//! One file per feature (`join`, `sync`, `manifests`, `users`, ...), each holding the tests of
//! that feature and the helpers only it uses; `chaos` runs randomized fault schedules.
//! `harness.rs` starts head and edge daemons, runs the CLI and holds the waits and deadlines
//! every file shares. `tests/support/` holds the emulators: `kube_api` (the Kubernetes API),
//! `namecheap` (the Namecheap DNS API) and `relay` (a UDP relay that cuts and degrades links).
//! Run one feature with `cargo test --test it join::`.

mod browser;
mod certificates;
mod chaos;
mod cli;
mod daemons;
mod deploy;
mod dns;
mod edits;
mod fleet;
mod harness;
mod heads;
mod inputs;
mod join;
mod kube;
mod limits;
mod links;
mod manifests;
mod metrics;
mod monitoring;
mod namespaces;
mod offline;
mod portal;
mod sync;
mod users;

#[path = "../support/kube_api.rs"]
mod kube_api;
#[path = "../support/namecheap.rs"]
mod namecheap;
#[path = "../support/relay.rs"]
mod relay;
