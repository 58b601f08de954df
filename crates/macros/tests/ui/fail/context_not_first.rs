use flotilla_task::TaskContext;

#[flotilla_macros::task]
fn fetch(url: String, ctx: TaskContext) -> usize {
    let _ = ctx;
    url.len()
}

fn main() {
    let _ = fetch;
}
