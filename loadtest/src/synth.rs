//! Deterministic synthetic content: every blob is a pure function of a seed
//! and a size, so nothing large is ever kept in memory or on disk by the
//! load generator, and a seed run can be repeated exactly.

use bytes::Bytes;
use serde::Serialize;
use sha2::{Digest, Sha256};

/// Bytes generated per chunk when a blob is hashed or streamed.
pub const CHUNK: usize = 1 << 20;

/// One blob: its bytes are `content(seed, size)`.
#[derive(Debug, Clone, Serialize)]
pub struct BlobSpec {
    pub seed: u64,
    pub size: u64,
    pub digest: String,
    pub media_type: String,
}

/// A blob given explicitly (configs, manifests).
#[derive(Debug, Clone)]
pub struct Literal {
    pub bytes: Bytes,
    pub digest: String,
}

impl Literal {
    pub fn new(bytes: Vec<u8>) -> Self {
        let digest = sha256_digest(&bytes);
        Literal {
            bytes: Bytes::from(bytes),
            digest,
        }
    }
}

/// One image: a config blob and layers, pushed under `name:tag`.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    pub name: String,
    pub tag: String,
    pub config: Literal,
    pub layers: Vec<BlobSpec>,
    pub manifest: Literal,
}

impl ImageSpec {
    /// `name:tag`.
    pub fn reference(&self) -> String {
        format!("{}:{}", self.name, self.tag)
    }

    /// Bytes a client downloads for this image: manifest, config and layers.
    pub fn pull_bytes(&self) -> u64 {
        self.manifest.bytes.len() as u64
            + self.config.bytes.len() as u64
            + self.layers.iter().map(|l| l.size).sum::<u64>()
    }
}

/// `sha256:<hex>` of a byte slice.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

/// splitmix64: fast, well-mixed, and enough to make content incompressible.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The content of blob `(seed, size)` as an iterator of chunks of at most [`CHUNK`] bytes.
pub fn chunks(seed: u64, size: u64) -> impl Iterator<Item = Bytes> + Send + 'static {
    let mut state = seed ^ size.rotate_left(17);
    let mut left = size;
    std::iter::from_fn(move || {
        if left == 0 {
            return None;
        }
        let n = left.min(CHUNK as u64) as usize;
        let mut buf = vec![0u8; n];
        for word in buf.chunks_mut(8) {
            let v = next(&mut state).to_le_bytes();
            word.copy_from_slice(&v[..word.len()]);
        }
        left -= n as u64;
        Some(Bytes::from(buf))
    })
}

/// Hashes blob `(seed, size)` without keeping it.
pub fn blob(seed: u64, size: u64, media_type: &str) -> BlobSpec {
    let mut h = Sha256::new();
    for c in chunks(seed, size) {
        h.update(&c);
    }
    BlobSpec {
        seed,
        size,
        digest: format!("sha256:{:x}", h.finalize()),
        media_type: media_type.to_string(),
    }
}

pub const LAYER_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const CONFIG_TYPE: &str = "application/vnd.oci.image.config.v1+json";
pub const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

/// The shape of an image set: every image has all the shared layers (the
/// common base) and its own unique layers, plus a small config blob.
#[derive(Debug, Clone)]
pub struct ImageSetShape {
    /// Repository prefix; images are `<prefix>-<i>:v1`.
    pub prefix: String,
    pub images: usize,
    pub shared_layers: Vec<u64>,
    pub unique_layers: Vec<u64>,
    /// Seeds distinct image sets apart.
    pub seed: u64,
}

/// Builds (and hashes) the images of a shape.
pub fn image_set(shape: &ImageSetShape) -> Vec<ImageSpec> {
    let shared: Vec<BlobSpec> = shape
        .shared_layers
        .iter()
        .enumerate()
        .map(|(j, &size)| blob(shape.seed * 1_000_003 + j as u64, size, LAYER_TYPE))
        .collect();
    (0..shape.images)
        .map(|i| {
            let mut layers = shared.clone();
            for (j, &size) in shape.unique_layers.iter().enumerate() {
                let seed = shape.seed * 1_000_003 + 1000 * (i as u64 + 1) + j as u64;
                layers.push(blob(seed, size, LAYER_TYPE));
            }
            image(&format!("{}-{i}", shape.prefix), "v1", layers)
        })
        .collect()
}

/// An image from its layers: an OCI config listing them, and its manifest.
pub fn image(name: &str, tag: &str, layers: Vec<BlobSpec>) -> ImageSpec {
    let diff_ids: Vec<&str> = layers.iter().map(|l| l.digest.as_str()).collect();
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": { "Cmd": ["/bin/true"], "Labels": { "image": name } },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    });
    let config = Literal::new(serde_json::to_vec(&config).expect("a JSON value serializes"));
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {
            "mediaType": CONFIG_TYPE,
            "digest": config.digest,
            "size": config.bytes.len(),
        },
        "layers": layers.iter().map(|l| serde_json::json!({
            "mediaType": l.media_type,
            "digest": l.digest,
            "size": l.size,
        })).collect::<Vec<_>>(),
    });
    let manifest = Literal::new(serde_json::to_vec(&manifest).expect("a JSON value serializes"));
    ImageSpec {
        name: name.to_string(),
        tag: tag.to_string(),
        config,
        layers,
        manifest,
    }
}

/// Bytes of the distinct blobs (configs and layers, each once) of a set of
/// images: what a node's cache must fetch once, and no more.
pub fn distinct_blob_bytes(images: &[ImageSpec]) -> u64 {
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    for img in images {
        if seen.insert(img.config.digest.clone()) {
            total += img.config.bytes.len() as u64;
        }
        for l in &img.layers {
            if seen.insert(l.digest.clone()) {
                total += l.size;
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_is_deterministic_and_sized() {
        let a: Vec<Bytes> = chunks(7, CHUNK as u64 + 13).collect();
        let b: Vec<Bytes> = chunks(7, CHUNK as u64 + 13).collect();
        assert_eq!(a, b, "the same seed and size should give the same bytes");
        assert_eq!(a.len(), 2);
        assert_eq!(a[1].len(), 13);
        let c: Vec<Bytes> = chunks(8, CHUNK as u64 + 13).collect();
        assert_ne!(a, c, "another seed should give other bytes");
    }

    #[test]
    fn image_sets_share_base_layers() {
        let shape = ImageSetShape {
            prefix: "t/app".into(),
            images: 3,
            shared_layers: vec![1000],
            unique_layers: vec![10, 20],
            seed: 1,
        };
        let set = image_set(&shape);
        assert_eq!(set.len(), 3);
        assert_eq!(set[0].layers[0].digest, set[2].layers[0].digest);
        assert_ne!(set[0].layers[1].digest, set[1].layers[1].digest);
        let configs: u64 = set.iter().map(|i| i.config.bytes.len() as u64).sum();
        assert_eq!(distinct_blob_bytes(&set), 1000 + 3 * 30 + configs);
    }
}
