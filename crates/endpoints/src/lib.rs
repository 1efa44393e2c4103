//! The one way ferry turns what a user typed into an open endpoint, for `copy`, `checksum`,
//! `info`, `map` and `demo` alike: a word becomes a [`Spec`] (a `[ CMD … ]` server started for
//! the copy, `-`, `null:`, an http(s) URL, an NBD URI or a path), and [`open`] opens a spec as
//! a source or a destination with one [`OpenOptions`].
//!
//! It owns which endpoint type a word means and how the user's connection flags apply to it;
//! it never decides how a copy runs (that is `copy`'s) and never prints.

mod error;
mod open;
mod spec;

pub use error::Error;
pub use open::{
    Format, HttpSettings, NbdOptions, OpenOptions, Opened, Role, looks_like_qcow2, open,
};
pub use spec::{Spec, extract_commands};
