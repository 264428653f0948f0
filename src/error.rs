//! What a client is told when the proxy refuses or ends its session. Every
//! refusal passes through [`ClientError::fields`], whose exhaustive match
//! decides the SQLSTATE and the message together; internal details stay out.

use crate::wire::ErrorFields;

/// A refusal or failure that is reported to the client as an ErrorResponse.
///
/// Messages here reach the client: they name what was wrong with the client's
/// own input but never carry upstream passwords, file paths or stack traces.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The client broke the protocol (bad packet, wrong message, bad length).
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The client asked for something the proxy does not serve.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The startup `user` is not a role in the config.
    #[error("role \"{0}\" is not served by this proxy")]
    UnknownRole(String),
    /// The client's token was refused; the text says which check failed.
    #[error("{0}")]
    InvalidToken(String),
    /// The client sent no usable password message for a token role.
    #[error("{0}")]
    MissingToken(String),
    /// A startup parameter the proxy must not pass on.
    #[error("{0}")]
    ForbiddenParameter(String),
    /// The upstream server could not be reached or refused the proxy's login.
    #[error("{0}")]
    UpstreamUnavailable(String),
    /// An error the upstream server reported, passed on with its own SQLSTATE.
    #[error("{}", .0.message)]
    Upstream(ErrorFields),
    /// No upstream connection became free in time.
    #[error("{0}")]
    PoolTimeout(String),
    /// The session could not be set up upstream (claims refused, reset failed).
    #[error("{0}")]
    SessionSetup(String),
    /// The proxy is shutting down.
    #[error("terminating connection: the proxy is shutting down")]
    ShuttingDown,
    /// The client must use TLS and did not ask for it.
    #[error("TLS is required: connect with sslmode=require (the token would travel in clear text)")]
    TlsRequired,
    /// `max_clients` connections are already served.
    #[error("too many clients: this proxy serves at most {0} at once")]
    TooManyClients(usize),
    /// Start-up and authentication took longer than `startup_timeout`.
    #[error("start-up and authentication did not finish within {0:?}")]
    StartupTimeout(std::time::Duration),
}

impl ClientError {
    /// The ErrorResponse fields (severity FATAL) for this refusal.
    pub fn fields(&self) -> ErrorFields {
        let (code, message) = match self {
            ClientError::Protocol(_) => ("08P01", self.to_string()),
            ClientError::Unsupported(_) => ("0A000", self.to_string()),
            ClientError::UnknownRole(_) => ("28000", self.to_string()),
            ClientError::InvalidToken(_) => ("28000", self.to_string()),
            ClientError::MissingToken(_) => ("28P01", self.to_string()),
            ClientError::ForbiddenParameter(_) => ("42501", self.to_string()),
            ClientError::UpstreamUnavailable(_) => ("08006", self.to_string()),
            ClientError::Upstream(fields) => {
                let mut fields = fields.clone();
                fields.severity = "FATAL".to_owned();
                return fields;
            }
            ClientError::PoolTimeout(_) => ("53300", self.to_string()),
            ClientError::SessionSetup(_) => ("28000", self.to_string()),
            ClientError::ShuttingDown => ("57P01", self.to_string()),
            ClientError::TlsRequired => ("08004", self.to_string()),
            ClientError::TooManyClients(_) => ("53300", self.to_string()),
            ClientError::StartupTimeout(_) => ("57014", self.to_string()),
        };
        ErrorFields {
            severity: "FATAL".to_owned(),
            code: code.to_owned(),
            message,
            detail: None,
            hint: None,
        }
    }

    /// A short stable label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientError::Protocol(_) => "protocol",
            ClientError::Unsupported(_) => "unsupported",
            ClientError::UnknownRole(_) => "unknown_role",
            ClientError::InvalidToken(_) => "invalid_token",
            ClientError::MissingToken(_) => "missing_token",
            ClientError::ForbiddenParameter(_) => "forbidden_parameter",
            ClientError::UpstreamUnavailable(_) => "upstream_unavailable",
            ClientError::Upstream(_) => "upstream_error",
            ClientError::PoolTimeout(_) => "pool_timeout",
            ClientError::SessionSetup(_) => "session_setup",
            ClientError::ShuttingDown => "shutting_down",
            ClientError::TlsRequired => "tls_required",
            ClientError::TooManyClients(_) => "too_many_clients",
            ClientError::StartupTimeout(_) => "startup_timeout",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_refusals_are_28000_with_the_reason() {
        let f = ClientError::InvalidToken("token expired at 2026-01-01T00:00:00Z".into()).fields();
        assert_eq!((f.severity.as_str(), f.code.as_str()), ("FATAL", "28000"));
        assert!(f.message.contains("expired"));
    }

    #[test]
    fn upstream_errors_keep_their_sqlstate() {
        let upstream = ErrorFields {
            severity: "ERROR".into(),
            code: "3D000".into(),
            message: "database \"nope\" does not exist".into(),
            ..Default::default()
        };
        let f = ClientError::Upstream(upstream).fields();
        assert_eq!((f.severity.as_str(), f.code.as_str()), ("FATAL", "3D000"));
    }
}
