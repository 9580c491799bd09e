//! The test's own requests: one request, a `GET`, and pushes of blobs and
//! manifests to a registry.

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::sha256_digest;

fn client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A request; returns status, headers, and the whole body or the error that
/// cut it short.
pub async fn request(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> (StatusCode, HeaderMap, Result<Bytes, String>) {
    let mut b = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = client()
        .request(b.body(Full::new(body)).unwrap())
        .await
        .unwrap_or_else(|e| panic!("{url}: {e:?}"));
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| format!("{e:?}"));
    (parts.status, parts.headers, body)
}

pub async fn get(
    url: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, HeaderMap, Result<Bytes, String>) {
    request(Method::GET, url, headers, Bytes::new()).await
}

/// Pushes `data` as a blob of `repo` with a monolithic upload; returns its digest.
pub async fn push_blob(registry: &str, repo: &str, data: &[u8]) -> String {
    push_blob_as(registry, &[], repo, data).await
}

/// [`push_blob`] with extra request headers (credentials).
pub async fn push_blob_as(
    registry: &str,
    auth: &[(&str, &str)],
    repo: &str,
    data: &[u8],
) -> String {
    let digest = sha256_digest(data);
    let (st, h, _) = request(
        Method::POST,
        &format!("{registry}/v2/{repo}/blobs/uploads/"),
        auth,
        Bytes::new(),
    )
    .await;
    assert_eq!(st, StatusCode::ACCEPTED, "the upstream accepts an upload");
    let loc = h["location"].to_str().unwrap();
    let loc = if loc.starts_with("http") {
        loc.to_owned()
    } else {
        format!("{registry}{loc}")
    };
    let sep = if loc.contains('?') { '&' } else { '?' };
    let mut headers = vec![("content-type", "application/octet-stream")];
    headers.extend_from_slice(auth);
    let (st, _, _) = request(
        Method::PUT,
        &format!("{loc}{sep}digest={digest}"),
        &headers,
        Bytes::copy_from_slice(data),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "the upstream stores the blob");
    digest
}

/// Pushes an OCI image manifest for `layers` (blobs already pushed) under
/// `tag`; returns the manifest bytes and digest.
pub async fn push_manifest(
    registry: &str,
    repo: &str,
    tag: &str,
    config: &[u8],
    layers: &[&[u8]],
) -> (Vec<u8>, String) {
    push_manifest_as(registry, &[], repo, tag, config, layers).await
}

/// [`push_manifest`] with extra request headers (credentials).
pub async fn push_manifest_as(
    registry: &str,
    auth: &[(&str, &str)],
    repo: &str,
    tag: &str,
    config: &[u8],
    layers: &[&[u8]],
) -> (Vec<u8>, String) {
    let cfg = push_blob_as(registry, auth, repo, config).await;
    let mut ls = Vec::new();
    for l in layers {
        let d = push_blob_as(registry, auth, repo, l).await;
        ls.push(serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": l.len()}));
    }
    let m = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg, "size": config.len()},
        "layers": ls,
    });
    let bytes = serde_json::to_vec_pretty(&m).unwrap();
    let mut headers = vec![("content-type", "application/vnd.oci.image.manifest.v1+json")];
    headers.extend_from_slice(auth);
    let (st, _, body) = request(
        Method::PUT,
        &format!("{registry}/v2/{repo}/manifests/{tag}"),
        &headers,
        Bytes::from(bytes.clone()),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "manifest push: {body:?}");
    let d = sha256_digest(&bytes);
    (bytes, d)
}

/// Pushes an OCI image index under `tag` whose entries are `(digest, size,
/// "os/arch[/variant]")` of manifests already pushed; returns its digest.
pub async fn push_index(
    registry: &str,
    repo: &str,
    tag: &str,
    manifests: &[(&str, usize, &str)],
) -> String {
    let entries: Vec<_> = manifests
        .iter()
        .map(|(digest, size, platform)| {
            let mut p = platform.split('/');
            let mut platform = serde_json::json!({"os": p.next(), "architecture": p.next()});
            if let Some(v) = p.next() {
                platform["variant"] = v.into();
            }
            serde_json::json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": digest, "size": size, "platform": platform,
            })
        })
        .collect();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": entries,
    });
    let bytes = serde_json::to_vec_pretty(&index).unwrap();
    let (st, _, body) = request(
        Method::PUT,
        &format!("{registry}/v2/{repo}/manifests/{tag}"),
        &[("content-type", "application/vnd.oci.image.index.v1+json")],
        Bytes::from(bytes.clone()),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "index push: {body:?}");
    sha256_digest(&bytes)
}
