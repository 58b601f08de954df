//! Compile tests of `#[flotilla::task]` against the real runtime: the cases
//! under `ui/pass` must compile and run, the cases under `ui/fail` must fail
//! with the errors recorded next to them in `.stderr` files.
//!
//! Regenerate the snapshots with `TRYBUILD=overwrite cargo test -p flotilla-macros --test ui`
//! and read the diff before committing it.

#[test]
fn ui() {
    let cases = trybuild::TestCases::new();
    cases.pass("tests/ui/pass/*.rs");
    cases.compile_fail("tests/ui/fail/*.rs");
}
