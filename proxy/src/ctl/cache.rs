//! `regproxy cache ls|rm|verify` (H-CACHE replaces the bodies).

use clap::{Args, Subcommand};

use super::{AdminArgs, CtlError};

#[derive(Args, Clone, Debug)]
pub struct CacheArgs {
    #[command(subcommand)]
    pub command: CacheCommand,
}

#[derive(Subcommand, Clone, Debug)]
pub enum CacheCommand {
    /// List what is cached.
    Ls {
        #[command(flatten)]
        admin: AdminArgs,
    },
}

pub async fn run(_a: CacheArgs) -> Result<bool, CtlError> {
    Err(CtlError::Usage("cache: being built (issue 12)".into()))
}
