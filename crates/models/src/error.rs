//! The crate's error type: every message names the file, key or option at fault.

use std::path::PathBuf;

/// A `Result` whose error is [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in `models`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    // ---- files and configs ----
    /// A file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file at fault.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A config file is not valid JSON or has a field of the wrong type.
    #[error("{}: {reason}", path.display())]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A config asks for an architecture option this crate does not implement.
    #[error("{}: `{key}` = {value} is not supported ({hint})", path.display())]
    Unsupported {
        /// The config file.
        path: PathBuf,
        /// The config key.
        key: String,
        /// Its value.
        value: String,
        /// What is supported.
        hint: String,
    },
    /// A model folder lacks a file.
    #[error("{}: missing {what} ({hint})", path.display())]
    MissingFile {
        /// The file or folder that was expected.
        path: PathBuf,
        /// What it is.
        what: String,
        /// What to do.
        hint: String,
    },
    /// Weights in a pickle format (`.bin`, `.ckpt`), which we never load.
    #[error("{}: only .safetensors weights are loaded (pickle files can run code when opened); convert it, e.g. in Python: `DiffusionPipeline.from_pretrained(path).save_pretrained(out, safe_serialization=True)`", path.display())]
    Pickle {
        /// The pickle file.
        path: PathBuf,
    },
    /// Downloading from the Hugging Face Hub failed.
    #[error("hub `{repo}` file `{file}`: {reason}")]
    Hub {
        /// The repo id.
        repo: String,
        /// The file in the repo.
        file: String,
        /// What went wrong.
        reason: String,
    },

    // ---- weights ----
    /// A weights file lacks a tensor the architecture needs.
    #[error("{file}: missing tensor `{key}` (shape {shape:?}); is this checkpoint for another architecture or config?")]
    MissingKey {
        /// The weights file(s).
        file: String,
        /// The key.
        key: String,
        /// The shape the architecture expects.
        shape: Vec<usize>,
    },
    /// A tensor has another shape than the architecture expects.
    #[error("{file}: tensor `{key}` has shape {found:?}, the config expects {expected:?}")]
    KeyShape {
        /// The weights file(s).
        file: String,
        /// The key.
        key: String,
        /// Its shape in the file.
        found: Vec<usize>,
        /// The shape the config implies.
        expected: Vec<usize>,
    },
    /// A weights file has tensors the architecture does not use.
    #[error("{file}: {count} tensor(s) not used by the model, e.g. `{first}` (a different architecture or config?)")]
    ExtraKeys {
        /// The weights file(s).
        file: String,
        /// How many.
        count: usize,
        /// The first one, by name.
        first: String,
    },
    /// The tokenizer files could not be used.
    #[error("tokenizer {}: {reason}", path.display())]
    Tokenizer {
        /// The tokenizer folder or file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Inputs of the wrong shape or value.
    #[error("{0}")]
    Input(String),

    // ---- wrapped ----
    /// An error from the atoms crate (adapters).
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
