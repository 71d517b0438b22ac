//! Errors shared by the stores of every layer.

use std::error::Error as StdError;

type BoxError = Box<dyn StdError + Send + Sync>;

/// Why a store operation (session or rate-limit) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store's backend is unavailable (down, timing out, or its breaker is open).
    #[error("store is unavailable")]
    Unavailable {
        /// What the backend reported.
        #[source]
        source: BoxError,
    },
    /// The backend answered, but the operation failed.
    #[error("store operation failed")]
    Failed {
        /// What the backend reported.
        #[source]
        source: BoxError,
    },
}

impl StoreError {
    /// Whether the error is an outage (as opposed to a failed operation).
    pub fn is_outage(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }
}

#[cfg(feature = "redis")]
impl From<crate::backend::BackendError> for StoreError {
    /// An outage (timeout, unreachable, breaker open) is `Unavailable`; anything else Redis
    /// answered is `Failed`.
    fn from(error: crate::backend::BackendError) -> Self {
        if error.is_outage() {
            Self::Unavailable {
                source: Box::new(error),
            }
        } else {
            Self::Failed {
                source: Box::new(error),
            }
        }
    }
}
