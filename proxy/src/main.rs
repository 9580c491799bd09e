use clap::Parser;
use regproxy::config::{Cli, Command};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            // Before anything is bound or opened: one clear line, non-zero exit.
            let config = match args.config() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("regproxy serve: {e}");
                    std::process::exit(2);
                }
            };
            regproxy::server::init_tracing(&config.log);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            // One line on stderr (the error and its causes), whatever
            // RUST_BACKTRACE says: the pod's last log line.
            if let Err(e) = rt.block_on(regproxy::server::serve(config)) {
                eprintln!("regproxy serve: {e:#}");
                std::process::exit(1);
            }
            Ok(())
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
