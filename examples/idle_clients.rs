//! Opens N connections with tokio-postgres and holds them idle, for the
//! memory benchmark in scripts/bench.sh. Prints "ready N" once all are
//! open, then waits until stdin closes.
//!
//! usage: idle_clients HOST PORT USER PASSWORD DATABASE COUNT

use std::io::Read;

use tokio_postgres::NoTls;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, host, port, user, password, database, count] = args.as_slice() else {
        return Err("usage: idle_clients HOST PORT USER PASSWORD DATABASE COUNT".into());
    };
    let count: usize = count.parse()?;
    let mut config = tokio_postgres::Config::new();
    config
        .host(host)
        .port(port.parse()?)
        .user(user)
        .password(password)
        .dbname(database);

    let mut clients = Vec::with_capacity(count);
    for _ in 0..count {
        let (client, connection) = config.connect(NoTls).await?;
        tokio::spawn(connection);
        client.simple_query("SELECT 1").await?;
        clients.push(client);
    }
    println!("ready {}", clients.len());
    tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
    })
    .await?;
    Ok(())
}
