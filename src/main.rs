use std::process::ExitCode;

use clap::Parser;
use mamba_mixer::cli::{run, Cli};

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(msg) => {
            println!("{msg}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
