//! What can go wrong while evaluating, each naming the file or flag to fix.

use std::path::PathBuf;

/// An evaluation error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A config or preprocessor file does not say what is needed.
    #[error("{}: {reason}", path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An image could not be decoded.
    #[error("{}: not a readable image ({reason})", path.display())]
    Image {
        /// The file.
        path: PathBuf,
        /// The decoder's message.
        reason: String,
    },
    /// The inputs do not fit together.
    #[error("{0}")]
    Input(String),
    /// From the model stack (weights, tokenizer, hub).
    #[error(transparent)]
    Models(#[from] models::Error),
    /// From candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Error {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// The crate's result.
pub type Result<T> = std::result::Result<T, Error>;
