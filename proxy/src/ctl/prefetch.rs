//! `regproxy prefetch`, `pin` and `unpin` (H-PREFETCH replaces the bodies).

use clap::Args;

use super::{AdminArgs, CtlError};

#[derive(Args, Clone, Debug)]
pub struct PrefetchArgs {
    #[command(flatten)]
    pub admin: AdminArgs,

    /// `os/arch[/variant]`; default: this node's.
    #[arg(long)]
    pub platform: Option<String>,

    /// Images: `[HOST/]NAME[:TAG|@DIGEST]`.
    #[arg(required = true)]
    pub refs: Vec<String>,
}

#[derive(Args, Clone, Debug)]
pub struct UnpinArgs {
    #[command(flatten)]
    pub admin: AdminArgs,

    /// Images as they were pinned.
    #[arg(required = true)]
    pub refs: Vec<String>,
}

pub async fn prefetch(_a: PrefetchArgs, _pin: bool) -> Result<bool, CtlError> {
    Err(CtlError::Usage("prefetch: being built (issue 12)".into()))
}

pub async fn unpin(_a: UnpinArgs) -> Result<bool, CtlError> {
    Err(CtlError::Usage("unpin: being built (issue 12)".into()))
}
