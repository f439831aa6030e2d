//! The one mapping from the application's error to a gRPC status.
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::error::Error;

pub fn code_of(e: &Error) -> Code {
    match e {
        Error::InvalidInput(_) => Code::InvalidArgument,
        Error::NotFound(_) => Code::NotFound,
        Error::FailedPrecondition(_) => Code::FailedPrecondition,
        Error::Unavailable(_) => Code::Unavailable,
        Error::Unauthenticated(_) => Code::Unauthenticated,
        Error::PermissionDenied(_) => Code::PermissionDenied,
        Error::ResourceExhausted { .. } => Code::ResourceExhausted,
        Error::Internal(_) => Code::Internal,
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let code = code_of(&e);
        match &e {
            Error::InvalidInput(violations) => {
                let details = ErrorDetails::with_bad_request(
                    violations
                        .iter()
                        .map(|v| tonic_types::FieldViolation::new(&v.field, &v.description))
                        .collect::<Vec<_>>(),
                );
                Status::with_error_details(code, e.to_string(), details)
            }
            Error::ResourceExhausted {
                message,
                retry_after: Some(after),
            } => Status::with_error_details(
                code,
                message.clone(),
                ErrorDetails::with_retry_info(Some(*after)),
            ),
            Error::Internal(_) => {
                tracing::error!(error = %e, "internal error");
                Status::new(code, e.to_string())
            }
            _ => Status::new(code, e.to_string()),
        }
    }
}
