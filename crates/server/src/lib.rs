//! The imageio-compatible transfer server.
