//! Sets up the tracing subscriber: the one place that decides log format.

use std::io::IsTerminal;

use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::EnvFilter;

/// Logs to stderr at `level` (trace, debug, info, warn, error); `RUST_LOG`
/// overrides it for finer control.
pub fn init(level: &str) -> Result<(), String> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.is_empty() => EnvFilter::try_new(spec).map_err(|e| format!("RUST_LOG: {e}"))?,
        _ => {
            let level: tracing::Level = level
                .parse()
                .map_err(|_| format!("log level {level:?} is not one of trace, debug, info, warn, error"))?;
            EnvFilter::new(format!(
                "warn,seamless_snapshotter={level},containerd_seamless_grpc={level}"
            ))
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        // One line per RPC when its span closes, with its fields and timing.
        .with_span_events(FmtSpan::CLOSE)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init()
        .map_err(|e| e.to_string())
}
