//! Signing's Redis side: the namespace's key fingerprint (so a process with
//! another secret fails at start) and signed results written straight into
//! a Redis command. The envelope itself is `flotilla_proto::seal`.

use flotilla_proto::{Codec, StoredOk};

/// Records `codec`'s fingerprint as the one the namespace signs with (the
/// scheduler does at start), so that a client or worker with another secret
/// fails at once with a clear error instead of having every message refused.
pub async fn publish_fingerprint(
    redis: &mut crate::Redis,
    names: &flotilla_proto::Names,
    codec: &Codec,
) -> redis::RedisResult<()> {
    redis::cmd("SET")
        .arg(names.seal_key())
        .arg(codec.fingerprint())
        .query_async(redis)
        .await
}

/// Checks `codec` against the fingerprint the namespace's scheduler
/// recorded. Passes when none is recorded yet (no scheduler has started)
/// or Redis cannot tell.
pub async fn check_fingerprint(
    redis: &mut crate::Redis,
    names: &flotilla_proto::Names,
    codec: &Codec,
) -> Result<(), flotilla_proto::ConfigError> {
    let recorded: Option<String> = redis::cmd("GET")
        .arg(names.seal_key())
        .query_async(redis)
        .await
        .unwrap_or(None);
    let ours = codec.fingerprint();
    match recorded {
        Some(theirs) if theirs != ours => Err(flotilla_proto::ConfigError::Secret { theirs, ours }),
        _ => Ok(()),
    }
}

/// A stored success written straight into a Redis command as one argument,
/// without first copying the value (see [`Codec::result_ok_arg`]).
#[derive(Debug, Clone)]
pub struct StoredOkArg<'a>(pub StoredOk<'a>);

impl redis::ToRedisArgs for StoredOkArg<'_> {
    fn write_redis_args<W>(&self, out: &mut W)
    where
        W: ?Sized + redis::RedisWrite,
    {
        use std::io::Write;
        let mut arg = out.writer_for_next_arg();
        for piece in self.0.pieces() {
            // Writing into the command's own buffer cannot fail.
            let _ = arg.write_all(piece);
        }
    }
}

impl redis::ToSingleRedisArg for StoredOkArg<'_> {}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_proto::{Config, Secret, StoredResult, TAG_OK};

    #[test]
    fn a_stored_ok_argument_is_the_encoded_value() {
        use redis::ToRedisArgs;
        let value: Vec<u8> = (0..=255).collect();
        assert_eq!(
            StoredOkArg(StoredResult::ok_arg(&value)).to_redis_args(),
            vec![StoredResult::encode_ok(&value)]
        );
        assert_eq!(
            StoredOkArg(StoredResult::ok_arg(&[])).to_redis_args(),
            vec![vec![TAG_OK]]
        );
        let mut cmd = redis::cmd("SET");
        cmd.arg("k").arg(StoredOkArg(StoredResult::ok_arg(&[1, 2])));
        assert_eq!(
            cmd.get_packed_command(),
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\n\x01\x02\x00\r\n"
        );
    }

    #[test]
    fn a_signed_result_is_written_as_stored() {
        let config = Config {
            namespace: "ns".to_owned(),
            secret: Some(Secret::new("s3cret")),
            ..Config::default()
        };
        let codec = Codec::new(&config);
        let stored = codec.result_ok("ns:r:a", b"value");
        let mut cmd = redis::cmd("SET");
        cmd.arg(StoredOkArg(codec.result_ok_arg("ns:r:a", b"value")));
        let packed = cmd.get_packed_command();
        assert!(packed.windows(stored.len()).any(|w| w == stored.as_slice()));
    }
}
