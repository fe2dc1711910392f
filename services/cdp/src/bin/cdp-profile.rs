//! `cdp-profile`: the profile-fold workers as their own process.

fn main() -> std::process::ExitCode {
    cdp_wiring::main("cdp-profile", cdp_profile::install)
}
