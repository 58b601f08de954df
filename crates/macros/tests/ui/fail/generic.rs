#[flotilla_macros::task]
fn identity<T>(value: T) -> T {
    value
}

fn main() {
    let _ = identity(1);
}
