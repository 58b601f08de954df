//! Datasets: publish futures under a name, so that other clients (another
//! program, a later run) can fetch them; the results stay stored until the
//! dataset is unpublished.
//!
//! `cargo run --example datasets` against a running cluster.

use flotilla::prelude::*;
use flotilla_examples::square;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let name = format!("squares-{}", std::process::id());
    {
        let producer = Client::from_env().await?;
        let squares = producer.map(square, (0..10).map(|x| (x,)));
        producer.publish_dataset(&name, &squares).await?;
        println!("published {name}");
        // The producer goes; the dataset keeps the results.
    }

    let consumer = Client::from_env().await?;
    println!("datasets: {:?}", consumer.list_datasets().await?);
    let squares = consumer.get_dataset::<i64>(&name).await?;
    let values = consumer.gather(&squares).await?;
    println!("{name} = {values:?}");
    anyhow::ensure!(
        values == (0..10).map(|x| x * x).collect::<Vec<i64>>(),
        "wrong squares"
    );
    consumer.unpublish_dataset(&name).await?;
    anyhow::ensure!(
        !consumer.list_datasets().await?.contains(&name),
        "unpublished"
    );
    Ok(())
}
