//! `cdp-query`: the single customer view (gRPC and the agent console) as
//! its own process.

fn main() -> std::process::ExitCode {
    cdp_wiring::main("cdp-query", cdp_query::install)
}
