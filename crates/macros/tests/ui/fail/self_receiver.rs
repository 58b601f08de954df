struct Calculator;

impl Calculator {
    #[flotilla_macros::task]
    fn add(&self, x: i64, y: i64) -> i64 {
        x + y
    }
}

fn main() {
    let _ = Calculator;
}
