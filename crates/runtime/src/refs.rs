//! Reference counts in Redis: who holds each result, and the atomic scripts
//! that take and drop holds and store results.
//!
//! Every key has a set of holders (`<ns>:h:{key}`): a client holding a
//! `TaskFuture` (its id), a pending dependent task (`t:<key>`),
//! `fire_and_forget` (`ff`), a published dataset (`ds:<name>`), a variable's
//! value (`var:<name>:<generation>`) or a queue item (`q:<name>:<item>`). The result (`<ns>:r:{key}`) lives exactly while that set is
//! non-empty: a release that empties it deletes the result in the same
//! script, and a result whose set is already empty is never stored. Both keys
//! share a hash tag, so each script touches one Redis Cluster slot.
//!
//! Every script gets a third key, the chunks hash (`<ns>:c:{key}`) of a
//! value stored in chunks under a manifest (see [`crate::store`]), with the
//! same hash tag: whatever deletes a result deletes its chunks with it
//! (`DEL` of a missing key costs nothing).
//!
//! Only [`crate::store::Store`] runs these scripts.

use crate::Redis;
use redis::{Pipeline, RedisResult, Script};
use std::sync::LazyLock;

/// The holder id of `fire_and_forget`.
pub const FIRE_AND_FORGET: &str = "ff";

/// The holder id a pending task uses for each of its inputs.
pub fn task_holder(key: &str) -> String {
    format!("t:{key}")
}

/// The holder id of a published dataset.
pub fn dataset_holder(name: &str) -> String {
    format!("ds:{name}")
}

/// `KEYS`: holders, result. `ARGV`: holder. Takes a hold; returns the tag
/// byte of a stored result (0 value, 1 error) or -1 when none is stored.
pub(crate) static HOLD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"redis.call('SADD', KEYS[1], ARGV[1])
          local tag = redis.call('GETRANGE', KEYS[2], -1, -1)
          if tag == '' then return -1 end
          return string.byte(tag)",
    )
});

/// The holder id of a `flotilla::Variable` value: one per `set`, so that
/// a future in both the old and the new value keeps the new value's hold
/// when the old one's is dropped.
pub fn variable_holder(name: &str, generation: &str) -> String {
    format!("var:{name}:{generation}")
}

/// The holder id of one queue item.
pub fn queue_holder(name: &str, item: &str) -> String {
    format!("q:{name}:{item}")
}

/// `KEYS`: holders, result. `ARGV`: holder, witness. Takes a hold only while
/// `witness` still holds the key (so the result is certainly still there);
/// returns like [`HOLD`], or -2 (and takes nothing) when the witness is gone.
pub(crate) static HOLD_IF_HELD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"if redis.call('SISMEMBER', KEYS[1], ARGV[2]) == 0 then return -2 end
          redis.call('SADD', KEYS[1], ARGV[1])
          local tag = redis.call('GETRANGE', KEYS[2], -1, -1)
          if tag == '' then return -1 end
          return string.byte(tag)",
    )
});

/// `KEYS`: holders, result. `ARGV`: holder. Takes a hold only while no
/// result is stored (for `fire_and_forget`, whose hold ends with the task).
/// Returns 1 when the hold was taken.
pub(crate) static HOLD_UNTIL_DONE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
          redis.call('SADD', KEYS[1], ARGV[1])
          return 1",
    )
});

/// `KEYS`: holders, result, chunks. `ARGV`: holder. Drops a hold; when none
/// is left, deletes the result and its chunks and returns 1 (the key is now
/// unreferenced).
pub(crate) static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    // `allow-oom`: it only frees memory, so it must run when Redis is full.
    Script::new(
        r"#!lua flags=allow-oom
          redis.call('SREM', KEYS[1], ARGV[1])
          if redis.call('SCARD', KEYS[1]) == 0 then
            redis.call('DEL', KEYS[2], KEYS[3])
            return 1
          end
          return 0",
    )
});

/// `KEYS`: holders, result, chunks. `ARGV`: encoded result. Stores a task's
/// result if anyone still wants it, then ends a `fire_and_forget` hold.
/// Returns 1 when the result is kept, 0 when it was stored and at once
/// released (its chunks too), -1 when nobody wanted it.
pub(crate) static STORE: LazyLock<Script> = LazyLock::new(|| {
    // An error never replaces a success: a task run again from a
    // redelivery after it finished (its inputs released since) fails, and
    // its dependents must still read the value of its first run.
    Script::new(&format!(
        r"if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
          local old = redis.call('GETRANGE', KEYS[2], -1, -1)
          if not (string.byte(ARGV[1], -1) == {err}
                  and (old == '\{ok}' or old == '\{chunked}')) then
            redis.call('SET', KEYS[2], ARGV[1])
          end
          redis.call('SREM', KEYS[1], 'ff')
          if redis.call('EXISTS', KEYS[1]) == 0 then
            redis.call('DEL', KEYS[2], KEYS[3])
            return 0
          end
          return 1",
        err = flotilla_proto::TAG_ERR,
        ok = flotilla_proto::TAG_OK,
        chunked = crate::store::TAG_CHUNKED,
    ))
});

/// `KEYS`: holders, result, chunks. Run right after a plain `SET` of a large result
/// (so the value is not copied through Lua): keeps it only if anyone still
/// wants it, then ends a `fire_and_forget` hold. Returns like [`STORE`].
/// A release racing in between deletes the result itself, so nothing leaks.
pub(crate) static FINALIZE: LazyLock<Script> = LazyLock::new(|| {
    // No `allow-oom`: when the value just written took Redis over its
    // `maxmemory`, this is refused and the writer rolls the value back.
    Script::new(
        r"if redis.call('EXISTS', KEYS[1]) == 0 then
            redis.call('DEL', KEYS[2], KEYS[3])
            return -1
          end
          redis.call('SREM', KEYS[1], 'ff')
          if redis.call('EXISTS', KEYS[1]) == 0 then
            redis.call('DEL', KEYS[2], KEYS[3])
            return 0
          end
          return 1",
    )
});

/// Results at least this large are stored with `SET` + `FINALIZE`
/// rather than through `STORE` (see [`crate::store::Batch::store_large_result`]).
pub const LARGE_RESULT: usize = 64 * 1024;

/// `KEYS`: holders, result. `ARGV`: holder, encoded value. Stores scattered
/// data and takes the scatterer's hold in one step, so a concurrent release
/// by another holder of the same content-addressed key can never delete it
/// (Dask's `scatter(hash=True)` race, dask/distributed#3703).
pub(crate) static SCATTER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"redis.call('SADD', KEYS[1], ARGV[1])
          redis.call('SET', KEYS[2], ARGV[2])
          return 1",
    )
});

/// The error code of the chunked scripts when the chunks hash does not
/// hold every chunk the manifest counts: a release (or a store nobody
/// wanted) deleted them while they were being written. The writer writes
/// them again.
pub(crate) const INCOMPLETE: &str = "INCOMPLETE";

/// `KEYS`: holders, result, chunks. `ARGV`: manifest, chunk count. Stores
/// the manifest of a value already written in chunks, like [`STORE`]: kept
/// (1) when someone holds the key, stored and at once released with its
/// chunks (0) when its last holder was `fire_and_forget`, and when nobody
/// wants it, not stored and its chunks deleted (-1), so that a release
/// racing the upload leaks nothing. Refused with [`INCOMPLETE`] when chunks
/// are missing.
pub(crate) static STORE_CHUNKED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"if redis.call('EXISTS', KEYS[1]) == 0 then
            redis.call('DEL', KEYS[3])
            return -1
          end
          if redis.call('HLEN', KEYS[3]) ~= tonumber(ARGV[2]) then
            return redis.error_reply('INCOMPLETE chunks were deleted while they were written')
          end
          redis.call('SET', KEYS[2], ARGV[1])
          redis.call('SREM', KEYS[1], 'ff')
          if redis.call('EXISTS', KEYS[1]) == 0 then
            redis.call('DEL', KEYS[2], KEYS[3])
            return 0
          end
          return 1",
    )
});

/// `KEYS`: holders, result, chunks. `ARGV`: holder, manifest, chunk count.
/// [`SCATTER`] for a value already written in chunks: takes the hold and
/// stores the manifest in one step; refused with [`INCOMPLETE`] (and takes
/// nothing) when chunks are missing.
pub(crate) static SCATTER_CHUNKED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"if redis.call('HLEN', KEYS[3]) ~= tonumber(ARGV[3]) then
            return redis.error_reply('INCOMPLETE chunks were deleted while they were written')
          end
          redis.call('SADD', KEYS[1], ARGV[1])
          redis.call('SET', KEYS[2], ARGV[2])
          return 1",
    )
});

/// `KEYS`: holders, result, chunks. `ARGV`: the location record expected,
/// the value's stored bytes or its chunks' manifest, the chunk count (`0`:
/// not chunked). A worker handing a kept value over to Redis: replaces the
/// record only while it is still the worker's own (not released, not
/// replaced meanwhile); otherwise deletes the chunks it wrote. Returns 1
/// when handed over, 0 when the record was gone or another; refused with
/// `INCOMPLETE` when chunks were deleted while they were written.
pub(crate) static HAND_OVER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"local count = tonumber(ARGV[3])
          if redis.call('GET', KEYS[2]) ~= ARGV[1] then
            if count > 0 then redis.call('DEL', KEYS[3]) end
            return 0
          end
          if count > 0 and redis.call('HLEN', KEYS[3]) ~= count then
            return redis.error_reply('INCOMPLETE chunks were deleted while they were written')
          end
          redis.call('SET', KEYS[2], ARGV[2])
          return 1",
    )
});

/// Every script, for loading them after a connect or a Redis restart.
pub(crate) fn all() -> [&'static Script; 10] {
    [
        &HOLD,
        &HOLD_IF_HELD,
        &HOLD_UNTIL_DONE,
        &RELEASE,
        &STORE,
        &FINALIZE,
        &SCATTER,
        &STORE_CHUNKED,
        &SCATTER_CHUNKED,
        &HAND_OVER,
    ]
}

/// Loads every script into Redis, so that pipelines of `EVALSHA`s do not
/// meet `NOSCRIPT` (and run again) in the common case.
pub(crate) async fn load_all(redis: &mut Redis) -> RedisResult<()> {
    for script in all() {
        script.prepare_invoke().load_async(redis).await?;
    }
    Ok(())
}

/// Adds an `EVALSHA` of `script` to a pipeline.
pub(crate) fn add(pipe: &mut Pipeline, script: &Script, keys: [&str; 3], args: &[&[u8]]) {
    let cmd = pipe
        .cmd("EVALSHA")
        .arg(script.get_hash())
        .arg(keys.len())
        .arg(&keys[..]);
    for arg in args {
        cmd.arg(*arg);
    }
}

/// Adds an `EVALSHA` of `script` on `key`'s holders set, result and chunks.
pub(crate) fn add_for(
    pipe: &mut Pipeline,
    names: &flotilla_proto::Names,
    script: &Script,
    key: &str,
    args: &[&[u8]],
) {
    let keys = [
        names.holders_key(key),
        names.result_key(key),
        names.chunks_key(key),
    ];
    add(pipe, script, [&keys[0], &keys[1], &keys[2]], args);
}

/// Runs a pipeline and returns each command's own reply: a command Redis
/// refuses (over `maxmemory`, say) is an `Err` in its place while the others
/// run. `Err` as a whole only when Redis could not be reached. Loads the
/// scripts first when Redis does not know them.
///
/// On a Redis Cluster, a pipeline must stay within one hash slot: the
/// commands are grouped by the slot of their first key (every operation of
/// a batch touches one slot, so its commands stay together and in order),
/// the groups run at once, and the replies come back in the pipeline's
/// order. A command refused because its node is not reachable now (a
/// failover: `CLUSTERDOWN`, `MOVED` after the connection's own retries)
/// makes the whole run `Err`, as an unreachable single server does: the
/// caller retries or gives its deliveries back rather than taking it for a
/// refusal of that one write.
pub(crate) async fn run_each(
    redis: &mut Redis,
    pipe: &Pipeline,
) -> RedisResult<Vec<RedisResult<redis::Value>>> {
    if !redis.is_cluster() {
        return run_one(redis, pipe).await;
    }
    let slots: Vec<u16> = pipe
        .cmd_iter()
        .map(|cmd| first_key(cmd).map_or(0, crate::redis_conn::slot_of))
        .collect();
    if slots.windows(2).all(|pair| pair[0] == pair[1]) {
        // One slot (a batch about one task): the pipeline as it is.
        return unreachable_as_a_whole(run_one(redis, pipe).await?);
    }
    let mut groups: std::collections::BTreeMap<u16, (Pipeline, Vec<usize>)> =
        std::collections::BTreeMap::new();
    for (index, (cmd, slot)) in pipe.cmd_iter().zip(&slots).enumerate() {
        let (group, positions) = groups
            .entry(*slot)
            .or_insert_with(|| (redis::pipe(), Vec::new()));
        group.add_command(cmd.clone());
        positions.push(index);
    }
    let outcomes = futures_util::future::join_all(groups.values().map(|(group, _)| {
        let mut redis = redis.clone();
        async move { run_one(&mut redis, group).await }
    }))
    .await;
    let mut replies: Vec<Option<RedisResult<redis::Value>>> =
        (0..slots.len()).map(|_| None).collect();
    for ((_, positions), outcome) in groups.values().zip(outcomes) {
        for (&position, reply) in positions.iter().zip(unreachable_as_a_whole(outcome?)?) {
            replies[position] = Some(reply);
        }
    }
    Ok(replies
        .into_iter()
        .map(|reply| reply.unwrap_or(Ok(redis::Value::Nil)))
        .collect())
}

/// A cluster pipeline's replies, or the first error among them that means
/// its node cannot answer now, as an error of the whole.
fn unreachable_as_a_whole(
    replies: Vec<RedisResult<redis::Value>>,
) -> RedisResult<Vec<RedisResult<redis::Value>>> {
    match replies
        .iter()
        .find_map(|reply| reply.as_ref().err().filter(|e| unreachable_now(e)))
    {
        Some(error) => Err(error.clone()),
        None => Ok(replies),
    }
}

/// [`run_each`] of one pipeline (on a cluster, of one slot).
async fn run_one(
    redis: &mut Redis,
    pipe: &Pipeline,
) -> RedisResult<Vec<RedisResult<redis::Value>>> {
    let mut pipe = pipe.clone();
    pipe.ignore_errors();
    let replies: Vec<RedisResult<redis::Value>> = pipe.query_async(redis).await?;
    let noscript = replies
        .iter()
        .any(|reply| matches!(reply, Err(error) if error.code() == Some("NOSCRIPT")));
    if !noscript {
        return Ok(replies);
    }
    for script in all() {
        script.prepare_invoke().load_async(redis).await?;
    }
    pipe.query_async(redis).await
}

/// Whether a command's own error means its node cannot answer now (a
/// failover under way), not that it refused the command.
fn unreachable_now(error: &redis::RedisError) -> bool {
    crate::transport::is_connection_error(error)
        || matches!(
            error.kind(),
            redis::ErrorKind::Server(
                redis::ServerErrorKind::Moved
                    | redis::ServerErrorKind::Ask
                    | redis::ServerErrorKind::ReadOnly
            )
        )
}

/// The first key of a command of a batch: the fourth argument of an
/// `EVALSHA` with keys, the second of the others (`SET`, `DEL`, `EXISTS`,
/// `ZREM`).
fn first_key(cmd: &redis::Cmd) -> Option<&[u8]> {
    let mut args = cmd.args_iter().map(|arg| match arg {
        redis::Arg::Simple(bytes) => bytes,
        _ => &[][..],
    });
    let name = args.next()?;
    if name.eq_ignore_ascii_case(b"EVALSHA") || name.eq_ignore_ascii_case(b"EVAL") {
        let _script = args.next()?;
        let keys: usize = std::str::from_utf8(args.next()?).ok()?.parse().ok()?;
        return if keys > 0 { args.next() } else { None };
    }
    args.next()
}

#[cfg(test)]
mod tests {
    #[test]
    fn holder_ids_do_not_collide_with_client_ids() {
        assert_eq!(super::task_holder("k"), "t:k");
        assert_eq!(super::dataset_holder("d"), "ds:d");
        assert_eq!(super::variable_holder("v", "1"), "var:v:1");
        assert_eq!(super::queue_holder("q", "2"), "q:q:2");
        // Client ids are 32 hex digits: never `ff`, never with a colon.
        assert_ne!(flotilla_proto::new_id(), super::FIRE_AND_FORGET);
    }
}
