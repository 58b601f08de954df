//! Compile-fail tests of `#[flotilla::task]`: the cases under `ui/fail` must
//! fail with the errors recorded next to them in `.stderr` files. Each is an
//! error the macro itself raises, so the cases name the macro crate
//! (`#[flotilla_macros::task]`, what `flotilla::task` re-exports) and
//! trybuild type-checks only a small project. The expansions that must
//! compile and run are tested against the real runtime in
//! `crates/client/tests/macros.rs`.
//!
//! Regenerate the snapshots with `TRYBUILD=overwrite cargo test -p flotilla-macros --test ui`
//! and read the diff before committing it.

#[test]
fn ui() {
    let cases = trybuild::TestCases::new();
    cases.compile_fail("tests/ui/fail/*.rs");
}
