//! The `tollgate` binary: the command line lives in the library (`cli/`), so that it is built,
//! linted and documented with everything else.

fn main() -> std::process::ExitCode {
    tollgate::cli::main()
}
