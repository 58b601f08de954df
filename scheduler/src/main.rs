//! `flotilla-scheduler`: tracks submitted tasks and their dependencies and
//! hands ready tasks to the workers.

use flotilla_proto::cli;

fn main() -> std::process::ExitCode {
    let parsed = cli::parse_or_exit(
        "flotilla-scheduler",
        "Flotilla's scheduler: tracks tasks and their dependencies and hands ready tasks to workers",
        &cli::CONNECTION_FLAGS,
    );
    cli::init_logging();
    let config = match parsed.config() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("flotilla-scheduler: {error}");
            return std::process::ExitCode::from(2);
        }
    };
    cli::warn_default_credentials(&config.amqp_url);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(flotilla_scheduler::run(config, cli::shutdown_signal())) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "scheduler failed");
            std::process::ExitCode::FAILURE
        }
    }
}
