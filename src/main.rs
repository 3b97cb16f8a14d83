//! The `strata` binary: parse arguments, run, print errors as one clear message.

use std::process::ExitCode;

fn main() -> ExitCode {
    strata::cli::main()
}
