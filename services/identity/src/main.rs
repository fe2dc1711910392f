//! `cdp-identity`: the identity-resolution workers as their own process.

fn main() -> std::process::ExitCode {
    cdp_runtime::serve::main("cdp-identity", cdp_identity::install)
}
