//! Placeholder until issue 12's cache admin lands (the helper replaces this file).

use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode};

use crate::api::App;
use crate::body::Body;
use crate::server::admin_api::error;

pub async fn admin_ls(_app: &Arc<App>, _body: Bytes) -> Response<Body> {
    error(StatusCode::NOT_IMPLEMENTED, "cache ls is being built")
}

pub async fn admin_rm(_app: &Arc<App>, _body: Bytes) -> Response<Body> {
    error(StatusCode::NOT_IMPLEMENTED, "cache rm is being built")
}

pub async fn admin_verify(_app: &Arc<App>, _body: Bytes) -> Response<Body> {
    error(StatusCode::NOT_IMPLEMENTED, "cache verify is being built")
}
