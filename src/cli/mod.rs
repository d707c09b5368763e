//! The `bobbin` command line. `main.rs` only parses arguments and calls [`run`].

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub mod render;
pub mod serve;

#[derive(Debug, Parser)]
#[command(
    name = "bobbin",
    version,
    about = "A tangled.org spindle that runs workflows as Tekton PipelineRuns"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the WorkflowRun CustomResourceDefinition as YAML.
    Crds,
    /// Print the Tekton PipelineRun(s) for a knot event or a workflow file (for `kubectl apply -f -`).
    Render(Box<render::RenderArgs>),
    /// Run the spindle: HTTP server, intake, controller and log followers (configured by
    /// `SPINDLE_*`/`BOBBIN_*` variables and `BOBBIN_CONFIG`).
    Serve,
}

/// Run one command. Errors are printed here; the exit code says what kind of failure it was
/// (2: bad input or configuration, 1: anything else).
pub async fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Crds => match crate::crd::crd_yaml() {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Render(args) => render::run(&args),
        Command::Serve => serve::run().await,
    }
}
