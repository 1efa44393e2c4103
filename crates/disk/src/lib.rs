//! Disk endpoints: local files and block devices, NBD exports, streams and `null:`; their
//! extents and capabilities, behind one [`Endpoint`] trait the copy engine drives.

pub mod direct;
pub mod endpoint;
pub mod export;
pub mod extents;
pub mod file;
pub mod file_extents;
pub mod memory;
pub mod nbd;
pub mod null;
pub mod pipe;
pub mod qcow2;
pub mod retry;
pub mod sink;
pub mod sparse;
pub mod subprocess;
pub mod write_behind;

pub use endpoint::{BoxFut, Caps, DiskError, Endpoint, ErrorKind, Op, StreamReader};
pub use extents::Extent;
pub use sink::{Budget, Permit, Segment, Sink, SinkOptions};
