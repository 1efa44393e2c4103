//! ferry's own NBD implementation: the sans-IO wire codec ([`proto`]), NBD URIs ([`uri`]), TLS
//! configuration ([`tls`]) and the async pipelined client ([`client`]).

#![forbid(unsafe_code)]

pub mod client;
pub mod error;
pub mod proto;
pub mod server;
pub mod tls;
pub mod uri;
mod vectored;

pub use client::{Client, ClientSettings, ConnectOptions, Connection, Negotiated, Reply};
pub use error::{Error, Result};
