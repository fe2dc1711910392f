//! `cdp-ingest`: the gRPC and HTTP intake as its own process.

fn main() -> std::process::ExitCode {
    cdp_wiring::main("cdp-ingest", cdp_ingest::install)
}
