//! The trainer's one error type. Every path a user's input reaches (configs, data files,
//! checkpoints, tableaux) returns one of these with a message naming the key or file at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration key holds a value that makes no sense; `key` is the dotted TOML path.
    #[error("config: `{key}`: {msg}")]
    Config { key: String, msg: String },

    /// A Butcher tableau that is not a valid explicit Runge-Kutta method.
    #[error("tableau `{name}`: {msg}")]
    Tableau { name: String, msg: String },

    /// A data file that is missing, truncated, corrupt or inconsistent.
    #[error("data file {}: {msg}", path.display())]
    Data { path: PathBuf, msg: String },

    /// A checkpoint or weights file that cannot be used.
    #[error("checkpoint {}: {msg}", path.display())]
    Checkpoint { path: PathBuf, msg: String },

    /// The loss or the parameters became NaN/Inf and retries with smaller steps did not help.
    #[error("non-finite values: {0}")]
    NonFinite(String),

    /// The cause is part of the message and deliberately not a `#[source]`: error chains
    /// (`{:#}`) would print it twice.
    #[error("io error on {}: {cause}", path.display())]
    Io { path: PathBuf, cause: std::io::Error },

    #[error("model: {0}")]
    Candle(#[from] candle_core::Error),

    #[error("{0}")]
    Other(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn config(key: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Config { key: key.into(), msg: msg.into() }
    }
    pub fn data(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Data { path: path.into(), msg: msg.into() }
    }
    pub fn checkpoint(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Checkpoint { path: path.into(), msg: msg.into() }
    }
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), cause: source }
    }
}
