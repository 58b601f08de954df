#[flotilla::task]
struct Job;

fn main() {
    let _ = Job;
}
