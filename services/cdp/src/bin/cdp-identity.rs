//! `cdp-identity`: the identity-resolution workers as their own process.

fn main() -> std::process::ExitCode {
    cdp_wiring::main("cdp-identity", cdp_identity::install)
}
