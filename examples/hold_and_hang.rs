//! A client that holds results and then hangs: the chaos and lifecycle
//! tests kill it with SIGKILL and check that its references are released
//! once its lease lapses.

use flotilla_examples::{byte_len, inc};

fn main() -> anyhow::Result<()> {
    let client = flotilla::blocking::Client::from_env()?;
    let data = client.scatter_many((0..50u8).map(|i| serde_bytes::ByteBuf::from(vec![i; 100])))?;
    let lengths: Vec<_> = data.iter().map(|d| client.submit(byte_len, (d,))).collect();
    let chain: Vec<_> = (0..200i64).map(|i| client.submit(inc, (i,))).collect();
    let results = client.gather(&chain)?;
    anyhow::ensure!(results.len() == 200 && client.gather(&lengths)?.len() == 50);
    println!(
        "holding {} futures",
        data.len() + lengths.len() + chain.len()
    );
    loop {
        std::thread::sleep(std::time::Duration::from_secs(60));
    }
}
