//! Test harness for starting real NBD peers.
