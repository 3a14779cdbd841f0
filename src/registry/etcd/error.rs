//! etcd-client errors as [`RegistryError`]s, and calls bounded in time.

use std::future::Future;
use std::time::Duration;

use crate::registry::RegistryError;

/// Bounds one call by `timeout` and maps its error.
pub(super) async fn bounded<T>(
    timeout: Duration,
    call: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, RegistryError> {
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => result.map_err(map_error),
        Err(_) => Err(RegistryError::Unavailable(format!(
            "no answer within {timeout:?}"
        ))),
    }
}

/// Whether the error says the member we asked is of no use now (down,
/// frozen, partitioned, without a leader), so the next call should go to
/// another. A lost lease, a canceled watch or a refusal are answers from a
/// working member.
pub(super) fn is_member_fault(error: &RegistryError) -> bool {
    matches!(error, RegistryError::Unavailable(_))
}

/// Whether a response was too large for the client's decode limit.
pub(super) fn is_too_large(error: &etcd_client::Error) -> bool {
    matches!(error, etcd_client::Error::GRpcStatus(status)
        if status.message().contains("message length too large"))
}

pub(super) fn map_error(error: etcd_client::Error) -> RegistryError {
    use etcd_client::Error;
    use tonic::Code;
    match error {
        Error::LeaseKeepAliveError(message) if message.contains("not found") => {
            RegistryError::LeaseLost(message)
        }
        Error::GRpcStatus(status) => match status.code() {
            Code::NotFound if status.message().contains("lease not found") => {
                RegistryError::LeaseLost(status.message().to_owned())
            }
            Code::PermissionDenied | Code::InvalidArgument | Code::Unauthenticated => {
                RegistryError::Rejected(status.message().to_owned())
            }
            // A read at a revision compacted meanwhile (a paged listing):
            // the member is fine, the listing starts over.
            Code::OutOfRange if status.message().contains("compacted") => {
                RegistryError::WatchCanceled(status.message().to_owned())
            }
            // With its causes: a failed TLS handshake is a status
            // "transport error" whose source says what went wrong.
            _ => {
                let message = status.message();
                let detail = match std::error::Error::source(&status).map(error_chain) {
                    Some(cause) if cause.starts_with(message) => cause,
                    Some(cause) => format!("{message}: {cause}"),
                    None => message.to_owned(),
                };
                RegistryError::Unavailable(format!("{:?}: {detail}", status.code()))
            }
        },
        Error::InvalidArgs(message) => RegistryError::Rejected(message),
        Error::InvalidUri(e) => RegistryError::Rejected(e.to_string()),
        // With its causes: tonic's "transport error" alone does not say
        // that a TLS handshake failed, or why.
        other => RegistryError::Unavailable(error_chain(&other)),
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let cause = e.to_string();
        if !text.ends_with(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
        source = e.source();
    }
    text
}
