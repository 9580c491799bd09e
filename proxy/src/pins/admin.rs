//! The pins on the admin listener: `GET /admin/pins`, `POST /admin/unpin`,
//! and their lines of `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode};
use serde_json::{json, Value};

use super::{Key, Pins};
use crate::api::App;
use crate::body::Body;
use crate::metrics::label_value;
use crate::server::admin_api::{error, json_response};

/// `GET /admin/pins`: `{"pins":[{ref, platform, source, top, digests,
/// previous, bytes, complete, offline_ready}]}`, `digests` and `previous`
/// counted.
pub async fn admin_pins(app: &Arc<App>, _body: Bytes) -> Response<Body> {
    let Some(pins) = app.pins() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "pins are not set up");
    };
    let list: Vec<Value> = pins
        .list()
        .iter()
        .map(|p| {
            json!({
                "ref": p.reference,
                "platform": p.platform,
                "source": p.source.as_str(),
                "top": p.top,
                "digests": p.digests.len(),
                "previous": p.previous.len(),
                "bytes": p.bytes,
                "complete": p.complete,
                "offline_ready": pins.offline_ready(p),
            })
        })
        .collect();
    json_response(StatusCode::OK, &json!({ "pins": list }))
}

/// `POST /admin/unpin` `{"refs":[..]}` → `{"removed":[..], "not_pinned":
/// [..], "in_file":[..]}`, each ref as given. Only the admin API's pins are
/// removed (every platform of the ref); a ref the prefetch file pins stays
/// pinned until its line goes, and is listed under `in_file`.
pub async fn admin_unpin(app: &Arc<App>, body: Bytes) -> Response<Body> {
    let Some(pins) = app.pins() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "pins are not set up");
    };
    #[derive(serde::Deserialize)]
    struct Ask {
        refs: Vec<String>,
    }
    let ask: Ask = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("expected {{\"refs\":[...]}}: {e}"),
            )
        }
    };
    let mut keys = Vec::new();
    for r in &ask.refs {
        match Key::new(r, None) {
            Ok(k) => keys.push((r, k.reference)),
            Err(e) => return error(StatusCode::BAD_REQUEST, &e),
        }
    }
    let (mut removed, mut not_pinned, mut in_file) = (vec![], vec![], vec![]);
    for (given, reference) in keys {
        let (was, file) = pins.unpin(&reference).await;
        if file {
            in_file.push(given);
        }
        if was {
            removed.push(given);
        } else if !file {
            not_pinned.push(given);
        }
    }
    json_response(
        StatusCode::OK,
        &json!({ "removed": removed, "not_pinned": not_pinned, "in_file": in_file }),
    )
}

impl Pins {
    /// `regproxy_pinned_bytes` and `regproxy_offline_ready{ref,platform}`,
    /// computed now.
    pub fn render_metrics(&self, s: &mut String) {
        let _ = write!(
            s,
            "# HELP regproxy_pinned_bytes Bytes of pinned images held in the cache.\n\
             # TYPE regproxy_pinned_bytes gauge\nregproxy_pinned_bytes {}\n",
            self.cache.pinned_bytes()
        );
        // One series per image, whichever sources pin it.
        let ready: BTreeMap<(String, String), bool> = self
            .list()
            .iter()
            .map(|p| {
                let k = (p.reference.clone(), p.platform.clone());
                (k, self.offline_ready(p))
            })
            .collect();
        if ready.is_empty() {
            return;
        }
        s.push_str("# HELP regproxy_offline_ready 1 while every manifest and blob of a pinned image is in the cache.\n");
        s.push_str("# TYPE regproxy_offline_ready gauge\n");
        for ((r, platform), ok) in ready {
            let _ = writeln!(
                s,
                "regproxy_offline_ready{{ref=\"{}\",platform=\"{}\"}} {}",
                label_value(&r),
                label_value(&platform),
                u8::from(ok)
            );
        }
    }
}
