use std::process::ExitCode;

use rollcall::cli::{Command, LogFormat};

fn main() -> ExitCode {
    let cli = match rollcall::cli::parse_with_config(std::env::args_os().collect()) {
        Ok(cli) => cli,
        Err(rollcall::cli::CliError::Config(e)) => {
            report(&format!("error: {e}"));
            return ExitCode::from(2);
        }
        // clap prints usage errors (exit 2), --help and --version (exit 0) itself.
        Err(rollcall::cli::CliError::Clap(e)) => e.exit(),
    };
    init_tracing(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            report(&format!("error: cannot start the async runtime: {e}"));
            return ExitCode::from(1);
        }
    };
    let code = runtime.block_on(run(cli.command));
    // Do not wait for lingering blocking tasks (e.g. a child process reaper) at exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    code
}

async fn run(command: Command) -> ExitCode {
    let result = match command {
        Command::Serve(args) => match rollcall::config::ServeConfig::from_args(args) {
            Ok(cfg) => rollcall::server::serve(cfg, rollcall::shutdown::on_signals())
                .await
                .map(|()| 0)
                .map_err(|e| (e.exit_code(), e.to_string())),
            Err(e) => Err((2, e.to_string())),
        },
        Command::Register(args) => rollcall::agent::run(args).await,
        Command::HipacheSync(args) => rollcall::hipache::run(args).await,
        Command::Status(args) => rollcall::status::run(args).await,
        Command::Docker(args) => rollcall::docker::run(args).await,
        Command::Check(args) => rollcall::agent::check_once(&args).await,
        Command::Completions(args) => rollcall::cli::print_completions(&args),
        Command::Man(args) => rollcall::cli::print_man(&args),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err((code, message)) => {
            report(&format!("error: {message}"));
            ExitCode::from(code)
        }
    }
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    // hickory logs every query at info: keep it at warn whatever RUST_LOG says about the rest.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info"))
        .add_directive("hickory_proto=warn".parse().unwrap());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_ansi(ansi)
        // A closed stderr must not turn a log line into a panic (tracing's internal-error
        // report uses eprintln!, which panics on EPIPE): logging is best effort.
        .log_internal_errors(false)
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Prints one line to stderr; a closed stderr is not worth a panic.
fn report(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}
