use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    bobbin::cli::run(bobbin::cli::Cli::parse()).await
}
