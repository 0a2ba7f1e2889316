//! Extractors whose rejections are problem+json, so a malformed body or query gets the same
//! error shape as every other failure.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use http::request::Parts;
use serde::de::DeserializeOwned;

use crate::problem::Problem;

/// `axum::Json` with a problem+json rejection (400, or 413 for an oversized body).
pub struct Json<T>(pub T);

impl<S, T> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(request, state).await {
            Ok(axum::Json(value)) => Ok(Json(value)),
            Err(rejection) => Err(json_problem(&rejection)),
        }
    }
}

fn json_problem(rejection: &JsonRejection) -> Problem {
    let status = rejection.status();
    if status == http::StatusCode::PAYLOAD_TOO_LARGE {
        Problem::new(status, "payload-too-large", "Payload too large")
            .with_detail(rejection.body_text())
    } else {
        // Unsupported media type and syntax errors are all a bad request from the client.
        Problem::bad_request(rejection.body_text())
    }
}

/// `axum::extract::Query` with a problem+json rejection.
pub struct Query<T>(pub T);

impl<S, T> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(value)| Query(value))
            .map_err(|rejection: QueryRejection| Problem::bad_request(rejection.body_text()))
    }
}
