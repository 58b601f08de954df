//! Parameter patterns, unit tasks, raw identifiers, names that look like the
//! generated ones, private tasks in modules and tasks made by `macro_rules!`.

use flotilla::__private::Task;

#[flotilla::task]
fn patterns(mut total: i64, (a, b): (i32, i32), _: u8) -> i64 {
    total += i64::from(a) + i64::from(b);
    total
}

#[flotilla::task]
fn nothing() {}

#[flotilla::task]
fn r#match(x: u8) -> u8 {
    x
}

#[flotilla::task]
fn lookalikes(ctx: i64, args: i64, __flotilla_arg0: i64, __flotilla_ctx: i64) -> i64 {
    ctx + args + __flotilla_arg0 + __flotilla_ctx
}

mod jobs {
    #[flotilla::task]
    fn private(x: u8) -> u8 {
        x
    }

    #[flotilla::task]
    pub(crate) fn public(x: u8) -> u8 {
        private::call(x)
    }
}

macro_rules! identity_task {
    ($name:ident, $ty:ty) => {
        #[flotilla::task]
        fn $name(x: $ty) -> $ty {
            x
        }
    };
}

identity_task!(passthrough, Result<u8, String>);

#[test]
fn compiles_and_runs() {
    assert_eq!(patterns::call(1, (2, 3), 0), 6);
    let _: <patterns as Task>::Args = (1_i64, (2_i32, 3_i32), 0_u8);
    nothing::call();
    let _: <nothing as Task>::Args = ();
    let _: <nothing as Task>::Output = ();
    assert_eq!(r#match::call(7), 7);
    assert!(<r#match as Task>::NAME.ends_with("::match"));
    assert_eq!(lookalikes::call(1, 2, 3, 4), 10);
    assert_eq!(jobs::public::call(5), 5);
    let _: <passthrough as Task>::Output = 5_u8;
}
