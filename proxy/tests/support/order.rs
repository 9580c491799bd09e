//! Pulls in a client's own request order, over plain HTTP, so that a test
//! can prove what each runtime's order gets: containerd never asks `/v2/`
//! first; it goes straight to `HEAD` of the manifest by tag.

use http::{Method, StatusCode};

use super::{request, sha256_digest};

/// Every manifest kind, as containerd asks for a tag.
pub const ACCEPT_MANIFESTS: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json";

/// One request of a pull and what it got.
#[derive(Debug)]
pub struct Step {
    pub what: String,
    pub status: StatusCode,
}

/// Pulls `repo:tag` from `base` in containerd's order: `HEAD` of the
/// manifest by tag, `GET` of it by digest, then `GET` of the config and of
/// every layer, each body checked against its digest. `auth` is an
/// `Authorization` value. Returns the steps taken, stopping at the first
/// one that did not answer 200 with the right bytes.
pub async fn containerd_order_pull(
    base: &str,
    repo: &str,
    tag: &str,
    auth: Option<&str>,
) -> Vec<Step> {
    let mut headers = vec![("accept", ACCEPT_MANIFESTS)];
    if let Some(a) = auth {
        headers.push(("authorization", a));
    }
    let mut steps = Vec::new();
    let (st, h, _) = request(
        Method::HEAD,
        &format!("{base}/v2/{repo}/manifests/{tag}"),
        &headers,
        Default::default(),
    )
    .await;
    steps.push(Step {
        what: format!("HEAD manifest {repo}:{tag}"),
        status: st,
    });
    if st != StatusCode::OK {
        return steps;
    }
    let digest = h["docker-content-digest"].to_str().unwrap().to_owned();
    let (st, _, body) = request(
        Method::GET,
        &format!("{base}/v2/{repo}/manifests/{digest}"),
        &headers,
        Default::default(),
    )
    .await;
    let body = body.unwrap_or_default();
    let ok = st == StatusCode::OK && sha256_digest(&body) == digest;
    steps.push(Step {
        what: format!("GET manifest {digest}"),
        status: if ok { st } else { StatusCode::IM_A_TEAPOT },
    });
    if !ok {
        return steps;
    }
    for d in referenced(&body) {
        let (st, _, body) = request(
            Method::GET,
            &format!("{base}/v2/{repo}/blobs/{d}"),
            &headers,
            Default::default(),
        )
        .await;
        let ok = st == StatusCode::OK && body.as_ref().is_ok_and(|b| sha256_digest(b) == d);
        steps.push(Step {
            what: format!("GET blob {d}"),
            status: if ok || st != StatusCode::OK {
                st
            } else {
                StatusCode::IM_A_TEAPOT
            },
        });
        if st != StatusCode::OK || !ok {
            return steps;
        }
    }
    steps
}

/// Whether every step of a pull answered 200 with the right bytes.
pub fn all_ok(steps: &[Step]) -> bool {
    !steps.is_empty() && steps.iter().all(|s| s.status == StatusCode::OK)
}

/// The config and layer digests of an image manifest.
pub fn referenced(manifest: &[u8]) -> Vec<String> {
    let m: serde_json::Value = serde_json::from_slice(manifest).unwrap();
    let mut out = vec![m["config"]["digest"].as_str().unwrap().to_owned()];
    for l in m["layers"].as_array().unwrap() {
        out.push(l["digest"].as_str().unwrap().to_owned());
    }
    out
}
