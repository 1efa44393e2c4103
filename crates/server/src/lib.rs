//! `ferry serve`: an imageio-compatible transfer server. Clients written for oVirt's
//! ovirt-imageio daemon (its own client library, virt-v2v's rhv-upload plugin) move disk images
//! through it unchanged.
//!
//! - [`ticket`] and [`store`]: the tickets that authorize transfers, their expiry,
//!   progress and cancellation — reusable by any front end (the NBD export of tickets too).
//! - [`backend`]: the images tickets point at (`file://`, NBD), over [`disk`] endpoints;
//!   `aligned` turns byte ranges into whole-block I/O for exports that need it.
//! - [`data`] and [`upload`]: the HTTP data API (`/images/{id}`, extents, `/info/`);
//!   [`checksum`]: `/images/{id}/checksum` and `/checksum/algorithms`, parallel and zero-aware.
//! - [`control`]: the ticket control API (`/tickets/{id}`); [`client`] speaks it.
//! - [`nbd_export`]: every ticket also served over NBD under its ticket id.
//! - [`conn`]: one HTTP connection (hyper), its timeouts and statistics; [`server`] binds the
//!   listeners; [`config`] reads the TOML configuration file.
//!
//! Wire behaviour follows ovirt-imageio 2.5 (status codes, headers, JSON documents and their
//! text, the order in which a request's checks run), with its known quirks fixed compatibly:
//! HEAD works, chunked uploads are accepted, typos in paths are 404, PATCH is in the CORS
//! allow-list, OPTIONS also reports size and block sizes, extents take an optional range, TLS
//! 1.2 is the minimum, expired tickets are reaped. The documents themselves are
//! `imageio::wire`'s, shared with the client. `tests/conformance` runs one corpus of requests
//! against this server and the reference daemon and lists every deliberate difference.

mod aligned;
pub mod backend;
pub mod checksum;
pub mod client;
pub mod config;
pub mod conn;
pub mod control;
pub mod data;
mod encoding;
mod gather;
pub mod metrics;
pub mod nbd_export;
pub mod range;
pub mod request;
pub mod respond;
pub mod server;
pub mod status;
pub mod store;
pub mod ticket;
pub mod upload;

pub use server::{ControlListen, Server, ServerConfig};
pub use store::TicketStore;
pub use ticket::TicketSpec;
