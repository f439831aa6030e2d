//! The one mapping from the application's error to HTTP, in the shapes the
//! original FastAPI bucket's clients already parse.
use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::error::Error;

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        match self {
            Error::InvalidInput(violations) => {
                // FastAPI's 422: {"detail": [{"loc": [...], "msg": ..., "type": ...}]}.
                let detail: Vec<Value> = violations
                    .iter()
                    .map(|v| {
                        json!({
                            "loc": v.field.split('.').collect::<Vec<_>>(),
                            "msg": v.description,
                            "type": "value_error",
                        })
                    })
                    .collect();
                (
                    StatusCode::UNPROCESSABLE_ENTITY,
                    Json(json!({ "detail": detail })),
                )
                    .into_response()
            }
            Error::NotFound(what) => detail(StatusCode::NOT_FOUND, format!("{what} not found")),
            Error::Unavailable(why) => detail(StatusCode::SERVICE_UNAVAILABLE, why),
            Error::Internal(why) => {
                tracing::error!(error = %why, "internal error");
                detail(StatusCode::INTERNAL_SERVER_ERROR, why)
            }
        }
    }
}

/// `{"detail": "..."}`, FastAPI's shape for every other error.
pub fn detail(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "detail": message.into() }))).into_response()
}
