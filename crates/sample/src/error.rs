//! The crate's error type.

use std::path::PathBuf;

/// A `Result` whose error is [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in `sample`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A scheduler config is malformed or asks for an option we do not implement.
    #[error("scheduler config {}: {reason}", path.display())]
    SchedulerConfig {
        /// The config file (or a description of where it came from).
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A request that cannot be run (sizes, steps, prompts).
    #[error("{0}")]
    Request(String),
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A PNG could not be written or read.
    #[error("png {}: {reason}", path.display())]
    Png {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// An error of the model stack.
    #[error(transparent)]
    Models(#[from] models::Error),
    /// An error of the adapters.
    #[error(transparent)]
    Atoms(#[from] atoms::Error),
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
