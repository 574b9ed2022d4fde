//! The one error type of the library crates. Every variant that comes from a file names the file,
//! so a user can act on the message without a backtrace.

use std::path::{Path, PathBuf};

/// Errors raised by Shears' library crates.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O operation on `path` failed.
    #[error("{path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The content of `path` is malformed or inconsistent.
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    /// A request that cannot be carried out (bad argument, unsupported combination).
    #[error("{0}")]
    Invalid(String),
}

/// Result alias for the library crates.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A malformed-content error for `path`.
    pub fn format(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }

    /// An I/O error for `path`; `what` says which operation failed ("cannot read", ...).
    pub fn io(path: impl AsRef<Path>, what: &'static str, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            what,
            source,
        }
    }

    /// A bad-request error.
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }
}

/// Attach a path to a `std::io::Result`.
pub trait IoContext<T> {
    /// Turn an I/O error into [`Error::Io`] naming `path`.
    fn at(self, path: impl AsRef<Path>, what: &'static str) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl AsRef<Path>, what: &'static str) -> Result<T> {
        self.map_err(|e| Error::io(path, what, e))
    }
}
