//! `loadtest`: seed a registry, pull through one, or compare regproxy with the
//! alternatives side by side. The logic lives in the library; see `lib.rs`.

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let cli = loadtest::cli::Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(loadtest::cli::run(cli))
}
