//! `purge`: deleting a namespace, for tests and operators.

use crate::error::{Error, Result};
use flotilla_proto::Config;
use flotilla_runtime::transport;

/// Deletes a namespace's shared queues, exchanges and Redis keys.
pub async fn purge(config: &Config) -> Result<()> {
    let names = config.names();
    let connection = transport::connect_amqp(&config.amqp_url, "flotilla purge").await?;
    let channel = connection.create_channel().await?;
    let mut redis = transport::connect_redis(&config.redis_url).await?;
    let result = transport::purge_namespace(&channel, &mut redis, &names).await;
    transport::close(&connection, "purged").await;
    result.map_err(|e| match e {
        transport::PurgeError::Amqp(e) => Error::from(e),
        transport::PurgeError::Redis(e) => Error::from(e),
        other => Error::Cluster(other.to_string()),
    })
}
