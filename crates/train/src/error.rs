//! The crate's error type.

use std::path::PathBuf;

/// A `Result` whose error is [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in `train`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A training image could not be read or decoded.
    #[error("{}: not a readable image ({reason}); fix or remove it, or pass --skip-bad-images", path.display())]
    BadImage {
        /// The file.
        path: PathBuf,
        /// What the decoder said.
        reason: String,
    },
    /// A folder holds no images.
    #[error("{}: no images found (jpg, png, webp, bmp, gif, tiff)", path.display())]
    NoImages {
        /// The folder.
        path: PathBuf,
    },
    /// A setting is out of range or inconsistent.
    #[error("{0}")]
    Config(String),
    /// A checkpoint cannot be resumed.
    #[error("checkpoint {}: {reason}", path.display())]
    Checkpoint {
        /// The checkpoint folder.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The loss stopped being a number.
    #[error("the loss became {value} at step {step}; the last good checkpoint is kept ({last}); try a lower --lr or --max-grad-norm")]
    NonFinite {
        /// The step.
        step: usize,
        /// The loss value.
        value: f32,
        /// The last good checkpoint, if any.
        last: String,
    },
    /// Writing the run's output failed (a full disk, an unwritable folder) after training
    /// started.
    #[error("could not write {what}: {reason}\n{resume}")]
    Write {
        /// What was being written.
        what: String,
        /// Why it failed.
        reason: String,
        /// What is intact and how to go on.
        resume: String,
    },
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// An error of the sampler.
    #[error(transparent)]
    Sample(#[from] sample::Error),
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

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
