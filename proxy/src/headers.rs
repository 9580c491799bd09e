//! The registry API's own header names, named once.

use http::header::HeaderName;

/// Every registry answer says which API it speaks; the proxy's too.
pub const API_VERSION: HeaderName = HeaderName::from_static("docker-distribution-api-version");
/// The value of [`API_VERSION`].
pub const API_VERSION_VALUE: &str = "registry/2.0";
/// The digest of the content a registry answered with.
pub const CONTENT_DIGEST: HeaderName = HeaderName::from_static("docker-content-digest");
