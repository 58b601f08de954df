//! Seed section "Complex Dependencies": a task with several future inputs.
//!
//! `cargo run --example complex_dependencies` against a running cluster.

use flotilla::prelude::*;
use flotilla_examples::{add, inc, square};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let client = Client::from_env().await?;
    let (x, y) = (7, 4);
    let a = client.submit(square, (x,)); // func1(x)
    let b = client.submit(inc, (y,)); // func2(y)
    let c = client.submit(add, (a, b)); // func3(a, b): waits for both
    let result = c.await?;
    println!("square({x}) + inc({y}) = {result}");
    anyhow::ensure!(result == 49 + 5, "expected 54");
    Ok(())
}
