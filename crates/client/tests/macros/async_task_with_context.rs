//! An async task taking the context first, registered under a custom name.

use flotilla::__private::Task;
use flotilla::TaskContext;

/// Fetches a URL.
#[flotilla::task(name = "custom.fetch")]
pub async fn fetch(ctx: TaskContext, url: String) -> Result<Vec<u8>, String> {
    let _ = &ctx;
    Ok(url.into_bytes())
}

/// The context can be spelled with its full path, and be the only parameter.
#[flotilla::task]
async fn only_context(_ctx: flotilla::TaskContext) {}

#[test]
fn compiles_and_runs() {
    assert_eq!(<fetch as Task>::NAME, "custom.fetch");
    let args: <fetch as Task>::Args = (String::from("https://example.com"),);
    let output: <fetch as Task>::Output = Vec::new();
    let _ = (args, output);

    let _: <only_context as Task>::Args = ();
    let _: <only_context as Task>::Output = ();
    let _ = only_context::call;
}
