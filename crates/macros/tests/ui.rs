//! Compile tests of `#[flotilla::task]` against the real runtime: the cases
//! under `ui/pass` must compile and run, the cases under `ui/fail` must fail
//! with the errors recorded next to them in `.stderr` files.
//!
//! Regenerate the snapshots with `TRYBUILD=overwrite cargo test -p flotilla-macros --test ui`
//! and read the diff before committing it.

#[test]
fn ui() {
    // trybuild builds the cases and their whole dependency tree in a project
    // of its own, which does not inherit the workspace's profile: without
    // debug info, as the workspace builds its dependencies, that build takes
    // a fraction of the time. (The only test in this binary, so setting the
    // variable races nothing.)
    std::env::set_var("CARGO_PROFILE_DEV_DEBUG", "false");
    let cases = trybuild::TestCases::new();
    cases.pass("tests/ui/pass/*.rs");
    cases.compile_fail("tests/ui/fail/*.rs");
}
