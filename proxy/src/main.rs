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
        Command::Hosts(args) => {
            // One line on stderr, for the init container's log.
            if let Err(e) = regproxy::hosts::run(args) {
                eprintln!("regproxy hosts: {e}");
                std::process::exit(1);
            }
            Ok(())
        }
    }
}
