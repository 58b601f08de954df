//! Seed section "Advanced Coordination", Variables: the client sets a
//! variable, a `reader` task gets it.
//!
//! Run against a cluster: `cargo run --example variable_example`
//! (scheduler and `flotilla-worker` processes on `FLOTILLA_NAMESPACE`).

use flotilla_examples::coordination::reader;

fn main() -> anyhow::Result<()> {
    let client = flotilla::blocking::Client::from_env()?;
    let name = format!("my-var-{}", std::process::id());
    let var = flotilla::sync::blocking::Variable::new(&client, &name);

    var.set(&42_i64)?; // Set value
    let future = client.submit(reader, (name.as_str(),)); // Get value from tasks
    let value = future.result()?;
    println!("reader() = {value}");
    anyhow::ensure!(value == 42, "expected 42, got {value}");
    var.delete()?;
    Ok(())
}
