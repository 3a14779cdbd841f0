//! zookeeper-client errors as [`RegistryError`]s, and calls bounded in time.

use std::future::Future;
use std::time::Duration;

use zookeeper_client::Error;

use crate::registry::RegistryError;

/// Bounds one call by `timeout` and maps its error. A call made while the
/// client is reconnecting waits for the connection, so the bound is what
/// turns an unreachable ensemble into `Unavailable`.
pub(super) async fn bounded<T>(
    timeout: Duration,
    call: impl Future<Output = Result<T, Error>>,
) -> Result<T, RegistryError> {
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => result.map_err(map_error),
        Err(_) => Err(RegistryError::Unavailable(format!(
            "no answer from ZooKeeper within {timeout:?}"
        ))),
    }
}

pub(super) fn map_error(error: Error) -> RegistryError {
    match error {
        // The session is the lease: it is gone, a new one must be made.
        Error::SessionExpired | Error::SessionMoved | Error::ClientClosed => {
            RegistryError::LeaseLost(error.to_string())
        }
        Error::NoAuth | Error::AuthFailed | Error::InvalidAcl | Error::BadArguments(_) => {
            RegistryError::Rejected(error.to_string())
        }
        other => RegistryError::Unavailable(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gone_session_is_a_lost_lease_and_acl_refusals_are_rejections() {
        assert!(matches!(
            map_error(Error::SessionExpired),
            RegistryError::LeaseLost(_)
        ));
        assert!(matches!(
            map_error(Error::NoAuth),
            RegistryError::Rejected(_)
        ));
        assert!(matches!(
            map_error(Error::ConnectionLoss),
            RegistryError::Unavailable(_)
        ));
    }
}
