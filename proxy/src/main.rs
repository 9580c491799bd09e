use clap::Parser;
use regproxy::config::{Cli, Command};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            regproxy::server::init_tracing(&args);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(regproxy::server::serve(args))
        }
    }
}
