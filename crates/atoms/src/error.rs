//! The crate's error type.
//!
//! Messages are lowercase, name the layer, tensor or file at fault, and say what was expected and
//! what was found. Nothing a user can feed in (a weight, a delta file, a base model) panics: every
//! failure is one of these variants.

use std::path::PathBuf;

/// A `Result` whose error is [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in `atoms`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    // ---- weights and layouts ----
    /// A weight has a shape no layout supports (only `[co, ci]` and `[co, ci, kh, kw]` do).
    #[error("unsupported weight shape {shape:?} (expected [co, ci] for a linear layer or [co, ci, kh, kw] for a convolution)")]
    UnsupportedShape {
        /// The shape that was given.
        shape: Vec<usize>,
    },
    /// The channel block of a linear layout does not divide the weight.
    #[error("block {bo}x{bi} does not divide linear weight [{co}, {ci}] (choose a block size whose sides divide both dimensions)")]
    BlockSize {
        /// Output channels of the weight.
        co: usize,
        /// Input channels of the weight.
        ci: usize,
        /// Block rows.
        bo: usize,
        /// Block columns.
        bi: usize,
    },
    /// A hyper-parameter is out of its range.
    #[error("invalid {name} = {value} ({hint})")]
    InvalidParameter {
        /// The parameter's name, as a user knows it.
        name: &'static str,
        /// The value that was given.
        value: String,
        /// The range or rule it must follow.
        hint: String,
    },

    // ---- delta files ----
    /// The file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file at fault.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The bytes are not a valid safetensors file (truncated, bad header, bad offsets).
    #[error("not a valid safetensors file: {0}")]
    Safetensors(String),
    /// A safetensors file without atomtune's format marker.
    #[error(
        "not an atomtune delta (its metadata has no `format = atomtune.delta`; found {found:?})"
    )]
    NotADelta {
        /// What the `format` key held, if anything.
        found: Option<String>,
    },
    /// A delta written by a newer atomtune.
    #[error("delta format version {found} is newer than this atomtune supports ({supported}); upgrade atomtune")]
    FormatVersion {
        /// The version in the file.
        found: u32,
        /// The newest version this build reads.
        supported: u32,
    },
    /// A metadata entry is missing or malformed.
    #[error("delta metadata `{key}`: {reason}")]
    Metadata {
        /// The metadata key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A tensor has a dtype other than the one the format prescribes.
    #[error("delta tensor `{tensor}` has dtype {found}, expected {expected}")]
    Dtype {
        /// The tensor's name.
        tensor: String,
        /// The dtype in the file.
        found: String,
        /// The dtype the format prescribes.
        expected: String,
    },
    /// A tensor's shape does not fit the method, its hyper-parameters or the base layer.
    #[error("delta tensor `{tensor}` has shape {found:?}, expected {expected:?}")]
    TensorShape {
        /// The tensor's name.
        tensor: String,
        /// The shape in the file.
        found: Vec<usize>,
        /// The shape that fits.
        expected: Vec<usize>,
    },
    /// A tensor name that the delta's method does not use.
    #[error("delta tensor `{tensor}` is not part of a `{method}` delta (expected `<layer>.{{{expected}}}`)")]
    UnexpectedTensor {
        /// The tensor's name.
        tensor: String,
        /// The delta's method.
        method: String,
        /// The suffixes the method uses, comma separated.
        expected: String,
    },
    /// A layer lacks a tensor its method needs.
    #[error("delta layer `{layer}` has no `{layer}.{suffix}` tensor")]
    MissingTensor {
        /// The layer's name.
        layer: String,
        /// The missing suffix.
        suffix: String,
    },

    // ---- delta against a base ----
    /// The delta names a layer that the base model does not have.
    #[error("delta layer `{layer}` does not exist in the base model (is the delta for another architecture?)")]
    UnknownLayer {
        /// The layer's name.
        layer: String,
    },
    /// The base weight of a layer has a shape the delta does not fit.
    #[error("delta layer `{layer}` does not fit base weight of shape {base:?}: {reason}")]
    BaseShape {
        /// The layer's name.
        layer: String,
        /// The base weight's shape.
        base: Vec<usize>,
        /// Why it does not fit.
        reason: String,
    },
    /// In strict mode, base weights whose fingerprint differs from the one the delta was trained on.
    #[error("delta was trained on base `{delta_base}` but {count} layer(s) differ in this base `{base}` (first: `{first_layer}`); drop --strict to apply it anyway")]
    FingerprintMismatch {
        /// The base id recorded in the delta.
        delta_base: String,
        /// The id of the base it is applied to.
        base: String,
        /// How many layers differ.
        count: usize,
        /// The first differing layer.
        first_layer: String,
    },

    /// The delta was trained on another model family than the base it is applied to.
    #[error("delta was trained on an {delta_arch} model (`{delta_base}`), but `{base}` is an {base_arch} model: a delta only applies to the family it was trained on (sd1 = SD 1.x, sd2 = SD 2.x, sdxl = SDXL)")]
    ArchitectureMismatch {
        /// The family recorded in the delta.
        delta_arch: String,
        /// The base id recorded in the delta.
        delta_base: String,
        /// The family of the base it is applied to.
        base_arch: String,
        /// The id of the base it is applied to.
        base: String,
    },

    // ---- wrapped ----
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

    pub(crate) fn invalid(
        name: &'static str,
        value: impl ToString,
        hint: impl Into<String>,
    ) -> Self {
        Error::InvalidParameter {
            name,
            value: value.to_string(),
            hint: hint.into(),
        }
    }

    pub(crate) fn meta(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Metadata {
            key: key.into(),
            reason: reason.into(),
        }
    }
}
