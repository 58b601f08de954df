//! Compile-fail tests of `#[flotilla::task]` against the real runtime: the
//! cases under `ui/fail` must fail with the errors recorded next to them in
//! `.stderr` files. (The cases that must compile and run are plain tests, in
//! `pass.rs`, so that trybuild only type-checks its project.)
//!
//! Regenerate the snapshots with `TRYBUILD=overwrite cargo test -p flotilla-macros --test ui`
//! and read the diff before committing it.

#[test]
fn ui() {
    let cases = trybuild::TestCases::new();
    cases.compile_fail("tests/ui/fail/*.rs");
}
