//! Placeholder until issue 12's pins lands (the helper replaces this file).

use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode};

use crate::api::App;
use crate::body::Body;
use crate::server::admin_api::error;

pub async fn admin_pins(_app: &Arc<App>, _body: Bytes) -> Response<Body> {
    error(StatusCode::NOT_IMPLEMENTED, "pins are being built")
}

pub async fn admin_unpin(_app: &Arc<App>, _body: Bytes) -> Response<Body> {
    error(StatusCode::NOT_IMPLEMENTED, "pins are being built")
}
