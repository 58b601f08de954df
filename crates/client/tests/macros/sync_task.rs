//! A plain synchronous task: the handle, `call` and the `Task` impl.

use flotilla::__private::Task;

/// Adds two numbers.
#[flotilla::task]
pub fn add(x: i64, y: i64) -> i64 {
    x + y
}

/// One argument: the arguments are a one-element tuple.
#[flotilla::task]
#[allow(clippy::needless_pass_by_value)]
fn shout(text: String) -> String {
    text.to_uppercase()
}

#[test]
fn compiles_and_runs() {
    assert_eq!(add::call(1, 2), 3);
    let handle: add = add;
    let _copy = handle;
    let _debug = format!("{handle:?}");

    let args: <add as Task>::Args = (1_i64, 2_i64);
    let output: <add as Task>::Output = 3_i64;
    let _ = (args, output);
    assert!(<add as Task>::NAME.ends_with("::add"));
    assert_ne!(<add as Task>::FINGERPRINT, <shout as Task>::FINGERPRINT);

    let args: <shout as Task>::Args = (String::from("hi"),);
    assert_eq!(shout::call(args.0), "HI");
}
