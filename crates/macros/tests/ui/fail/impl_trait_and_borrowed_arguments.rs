#[flotilla_macros::task]
fn describe(value: impl std::fmt::Display, label: &str) -> String {
    format!("{label}: {value}")
}

fn main() {}
