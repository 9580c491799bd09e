//! The prefetch engine ([`crate::prefetch::run`]) as the pins' [`Engine`],
//! and [`pin_fetched`], where a prefetch the admin API ran with `pin`
//! becomes a pin.

use std::sync::{Arc, Weak};

use futures_util::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use super::{Engine, Got, Key, Source};
use crate::api::App;
use crate::prefetch::{Fetched, Target};

/// Prefetches through the app, in process, marked as a prefetch.
struct Prefetch(Weak<App>);

impl Engine for Prefetch {
    fn run<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, Result<Got, String>> {
        Box::pin(async move {
            let app = self.0.upgrade().ok_or("shutting down")?;
            let t = Target::parse(&key.reference, Some(&key.platform))?;
            let mut quiet = |_| {};
            let f = crate::prefetch::run(&app, &t, &mut quiet).await?;
            Ok(got(&f))
        })
    }
}

fn got(f: &Fetched) -> Got {
    Got {
        top: f.top.clone(),
        digests: f.digests.clone(),
        bytes: f.bytes,
    }
}

/// Pins what a completed prefetch of `t` fetched, for `source`. An image
/// the cache could not keep all of is fetched again in the background.
pub async fn pin_fetched(
    app: &Arc<App>,
    t: &Target,
    f: &Fetched,
    source: Source,
) -> Result<(), String> {
    let pins = app.pins().ok_or("pins are not set up")?;
    let k = Key::of(t);
    let incomplete = pins.fetched(&k, Some(source), &got(f)).await;
    pins.after_fetch(&k, incomplete, 0);
    Ok(())
}

/// Starts the pins' background work (see [`super::worker`]) with the
/// prefetch engine, until `stop`.
pub fn start(app: &Arc<App>, stop: CancellationToken) {
    if let Some(pins) = app.pins() {
        pins.start(Arc::new(Prefetch(Arc::downgrade(app))), stop);
    }
}
