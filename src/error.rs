//! The crate's one error type.
//!
//! Variants fall in two families, told apart by [`MoeError::is_device_error`]:
//! "the device cannot" (no adapter, a limit it lacks, a lost device,
//! out of memory) and "the caller asked wrong" (a bad config key, a bad tensor,
//! a bad input shape, non-finite input). Every message names the key, tensor,
//! file or token at fault, so a command-line tool can print it as one line.

use std::path::PathBuf;

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
pub enum MoeError {
    /// A configuration key has a value outside its domain, or is unknown.
    #[error("config key `{key}`: {message}")]
    Config { key: String, message: String },

    /// A weight tensor is missing, has the wrong shape or dtype, or holds a non-finite value.
    #[error("tensor `{name}`: {message}")]
    Tensor { name: String, message: String },

    /// The tensor names of a weight file match no naming, or several at once.
    #[error("weight naming: {message}")]
    Naming { message: String },

    /// The input `x` has a shape the layer cannot take.
    #[error("input `x`: {message}")]
    InputShape { message: String },

    /// The input `x` holds NaN or infinity, or its router logits overflow; `token` is the
    /// first bad token (flattened index).
    #[error("input `x`: token {token} is not finite (or its router logits overflow)")]
    NonFiniteInput { token: usize },

    /// Training was asked of weights stored in another format than f32 (quantized or
    /// half-precision weights are for inference).
    #[error("tensor `{tensor}`: stored as {format}; training needs f32 weights")]
    TrainingNeedsF32 { tensor: String, format: String },

    /// A training call out of turn: on a layer built without `LayerOptions::trainable`,
    /// a backward before any training forward, an optimizer step before any backward.
    #[error("training: {message}")]
    Training { message: String },

    /// A file could not be read or written.
    #[error("file `{path}`: {message}")]
    File { path: PathBuf, message: String },

    /// No GPU adapter matched the request.
    #[error("no GPU adapter: {message}")]
    NoAdapter { message: String },

    /// The device's limits are too small for this layer or batch.
    #[error("device limit `{limit}`: need {needed}, the device allows {allowed}")]
    DeviceLimit {
        limit: &'static str,
        needed: u64,
        allowed: u64,
    },

    /// The device failed: lost, out of memory, or an internal validation error.
    #[error("device error: {message}")]
    Device { message: String },
}

impl MoeError {
    /// True for "the device cannot" errors, false for "the caller asked wrong" ones.
    pub fn is_device_error(&self) -> bool {
        matches!(
            self,
            MoeError::NoAdapter { .. } | MoeError::DeviceLimit { .. } | MoeError::Device { .. }
        )
    }

    pub(crate) fn config(key: &str, message: impl Into<String>) -> Self {
        MoeError::Config {
            key: key.to_string(),
            message: message.into(),
        }
    }

    /// A config error with the file its key came from added to its message; any other
    /// error unchanged.
    // Files are read natively only.
    #[cfg_attr(target_arch = "wasm32", allow(dead_code))]
    pub(crate) fn in_file(self, path: &std::path::Path) -> Self {
        match self {
            MoeError::Config { key, message } => MoeError::Config {
                key,
                message: format!("{message} (in {})", path.display()),
            },
            other => other,
        }
    }

    pub(crate) fn tensor(name: &str, message: impl Into<String>) -> Self {
        MoeError::Tensor {
            name: name.to_string(),
            message: message.into(),
        }
    }

    pub(crate) fn file(path: impl Into<PathBuf>, message: impl ToString) -> Self {
        MoeError::File {
            path: path.into(),
            message: message.to_string(),
        }
    }
}

/// Result with [`MoeError`].
pub type Result<T, E = MoeError> = std::result::Result<T, E>;
