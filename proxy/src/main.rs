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
        Command::Doctor(args) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            match rt.block_on(regproxy::node::doctor::doctor(args)) {
                Ok(true) => Ok(()),
                Ok(false) => std::process::exit(1),
                Err(e) => {
                    eprintln!("regproxy doctor: {e}");
                    std::process::exit(2);
                }
            }
        }
        Command::Sysctl => match regproxy::node::doctor::sysctl() {
            Ok(did) => {
                println!("regproxy sysctl: {did}");
                Ok(())
            }
            Err(e) => {
                eprintln!("regproxy sysctl: {e}");
                std::process::exit(1);
            }
        },
        Command::Probe(args) => match regproxy::server::probe::probe(&args) {
            Ok(body) => {
                print!("{body}");
                Ok(())
            }
            Err(e) => {
                eprintln!("regproxy probe: {e}");
                std::process::exit(1);
            }
        },
        cmd @ (Command::Prefetch(_)
        | Command::Pin(_)
        | Command::Unpin(_)
        | Command::Cache(_)
        | Command::Rate(_)) => std::process::exit(regproxy::ctl::main(cmd)),
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
