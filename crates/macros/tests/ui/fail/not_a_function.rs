#[flotilla_macros::task]
struct Job;

fn main() {
    let _ = Job;
}
