#[flotilla_macros::task(name = "jobs.add", retries = 3)]
fn add(x: i64, y: i64) -> i64 {
    x + y
}

fn main() {
    let _ = add;
}
