//! Disk endpoints: local files and block devices, NBD; their extents and capabilities.

pub mod extents;
pub mod file_extents;
