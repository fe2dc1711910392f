//! `cdp-projection`: projection rebuilds and replay as their own process
//! (one per deployment: a rebuild runs in the process that started it).

fn main() -> std::process::ExitCode {
    cdp_wiring::main("cdp-projection", cdp_projection::install)
}
