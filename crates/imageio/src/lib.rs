//! HTTP endpoints for the copy engine: ovirt-imageio transfer URLs
//! (`https://host:54322/images/TICKET`), read and written with streamed runs (one PUT or one
//! ranged GET per data run), PATCH zero and flush, extents, and several connections; and plain
//! HTTP(S) images, read-only, with ranged GETs (or one GET when the server ignores Range).

mod body;
pub mod compress;
pub mod endpoint;
mod request;
mod stream;
mod transport;
mod upload;
pub mod url;
pub mod wire;

pub use compress::WireCompression;
pub use endpoint::{Deadlines, HttpEndpoint, HttpOptions, ServerInfo, open, parse_extents};
pub use url::{HttpUrl, is_http_url};
