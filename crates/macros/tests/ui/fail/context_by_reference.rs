use flotilla_task::TaskContext;

#[flotilla_macros::task]
fn fetch(ctx: &TaskContext, url: String) -> usize {
    let _ = ctx;
    url.len()
}

fn main() {
    let _ = fetch;
}
