//! `k3sense`: one binary for every part of the system, like k3s's `server` / `agent`.
//!
//! ```text
//! k3sense              # = k3sense all: broker + simulated publisher + gateway, page on 127.0.0.1:8080
//! k3sense broker       # the MQTT broker (rumqttd)
//! k3sense publisher    # reads the sensor, publishes readings
//! k3sense gateway      # MQTT → WebSocket/HTTP, serves the page
//! k3sense check        # diagnoses a node: broker, sensor, gateway
//! k3sense watch        # live readings in the terminal
//! ```
//!
//! This file only sets up logging, parses the command line, turns SIGINT/SIGTERM into a
//! cancellation token and calls the component's `run`; the components are library crates.

mod all;
mod check;
mod cli;
mod connect;
mod logging;
mod shutdown;
mod watch;

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

use crate::cli::{Cli, Command};

fn main() -> anyhow::Result<ExitCode> {
    let mut cli = Cli::parse();
    logging::init(cli.log_format);
    cli.fill_passwords_from_env();
    // Two workers, or one where the process may use a single core (pinned with taskset, a CPU
    // quota of one, a one-core Pi): a second worker on the same core only adds wake-ups and
    // context switches between the two (measured: BENCHMARKS.md, "Equal CPU").
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get().min(2));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let token = shutdown::on_signal();
        let done = match cli.command.unwrap_or(Command::All(cli.all)) {
            Command::All(args) => all::run(args, token).await,
            Command::Broker(config) => k3sense_broker::run(config, token).await.map_err(Into::into),
            Command::Publisher(config) => k3sense_publisher::run(config, token)
                .await
                .map_err(Into::into),
            Command::Gateway(config) => k3sense_gateway::run(config, token)
                .await
                .map_err(Into::into),
            Command::Check(args) => return check::run(args, token).await,
            Command::Watch(args) => return watch::run(args, token).await,
        };
        done.map(|()| ExitCode::SUCCESS)
    })
}
