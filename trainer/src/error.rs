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

    /// A model handed inputs or tensors it cannot take (wrong count, shape or size).
    #[error("model: {0}")]
    Model(String),

    /// An optimizer's settings or saved state that it cannot use.
    #[error("optimizer: {0}")]
    Optimizer(String),

    /// No memory plan fits the budget; the message says what would fit.
    #[error("memory plan: {0}")]
    Plan(String),

    /// A collective (all-reduce, broadcast, …) failed on this rank.
    #[error("collective failed: {0}")]
    Comm(#[from] kutta_collectives::CommError),

    /// A step that failed on other ranks (each of them reports its own error): this rank stops
    /// with them.
    #[error("{what} failed on {ranks} other rank(s); see their messages")]
    PeerFailed { what: String, ranks: usize },

    /// The RK kernels or the CUDA driver under them (`kernels::cuda`); without the `cuda`
    /// feature only "not compiled with CUDA".
    #[error("GPU kernels: {0}")]
    Kernel(#[from] crate::kernels::cuda::KernelError),

    /// A signal handler that cannot be installed or a signal that cannot be forwarded.
    #[error("signals: {0}")]
    Signal(String),

    /// A call out of order or a broken internal invariant: a bug in kutta, not a user's mistake.
    #[error("internal error (a bug in kutta): {0}")]
    Internal(String),

    /// A config file that is not valid TOML or not a config at all (no single key at fault).
    #[error("config: {0}")]
    ConfigFile(String),

    /// A run folder that cannot be used as asked (`--out` not empty, `--resume` of a finished run).
    #[error("run folder {}: {msg}", path.display())]
    RunFolder { path: PathBuf, msg: String },

    /// An error with what was being done when it happened (`Error::context`).
    #[error("{context}: {inner}")]
    Context { context: String, inner: Box<Error> },

    /// An error followed by what to do about it or what it caused (`Error::advise`), e.g.
    /// "; the run stopped (the last checkpoint is …)".
    #[error("{inner}{advice}")]
    Advice { inner: Box<Error>, advice: String },
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
    pub fn model(msg: impl Into<String>) -> Self {
        Error::Model(msg.into())
    }
    pub fn optimizer(msg: impl Into<String>) -> Self {
        Error::Optimizer(msg.into())
    }
    pub fn internal(msg: impl Into<String>) -> Self {
        Error::Internal(msg.into())
    }
    /// This error followed by `advice` (which starts with its own separator, e.g. "; ").
    pub fn advise(self, advice: impl Into<String>) -> Self {
        Error::Advice { inner: Box::new(self), advice: advice.into() }
    }
    /// This error with what was being done when it happened, e.g. "evaluate".
    pub fn context(self, context: impl Into<String>) -> Self {
        Error::Context { context: context.into(), inner: Box::new(self) }
    }
}
