//! Futures inside the values of a [`Variable`](super::Variable) or the
//! items of a [`Queue`](super::Queue): a `TaskFuture<T>` anywhere in a value
//! (alone, in a `Vec`, a field of a struct...) keeps its result alive while
//! the primitive holds the value, and comes out as a live future of the
//! reader's client.
//!
//! A future is serialized as its key, and only while a primitive encodes a
//! value: the primitive records the keys found, takes its own hold on each
//! (`var:<name>:<generation>` or `q:<name>:<item>`, see
//! [`flotilla_runtime::store`]) *before* the value becomes visible, and stores
//! the value behind a small header naming the holder and the keys. Outside a
//! primitive, serializing a future is an error: an unheld key in some other
//! store could be freed at any moment.
//!
//! Reading takes the reader's own hold before the primitive can let go:
//! - a queue item is popped atomically, so only its getter can still drop
//!   the item's hold; it takes the client's hold first, then drops the item's;
//! - a variable's value may be replaced at any moment, so the reader takes its
//!   hold only while the value's own hold is still there (`HOLD_IF_HELD`), and
//!   reads the variable again when it was replaced in between. There is never
//!   a moment when neither holds the key.
//!
//! Every script touches the keys of one Redis Cluster slot: reading a
//! variable and holding its keys in one script would span the variable's
//! slot and each key's, which Redis Cluster refuses; the conditional hold
//! gives the same guarantee one slot at a time.
//!
//! Before taking holds, the reader sends what its client still has queued:
//! a release of an earlier handle of the same key, still on its way, must
//! not undo the new hold.

use crate::capture::{self, Resolver};
use crate::client::Client;
use crate::error::{Error, Result};
use crate::future::TaskFuture;
use crate::outbox::Op;
use crate::state::FutureState;
use flotilla_runtime::store::{Batch as StoreBatch, Held, Reply};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Arc;

/// First byte of a stored value that holds futures. `0xC1` is never used by
/// MessagePack, so a plain value never starts with it.
pub(crate) const MARK: u8 = 0xC1;

/// Lua `header(value)`: the header (mark, length, refs) of a stored value
/// that holds futures, or `false` (for scripts that hand back what they
/// replaced or deleted, without copying the value itself).
macro_rules! header_lua {
    () => {
        r#"
local function header(value)
  if not value or string.byte(value, 1) ~= 193 then return false end
  local a, b, c, d = string.byte(value, 2, 5)
  return string.sub(value, 1, 5 + ((a * 256 + b) * 256 + c) * 256 + d)
end
"#
    };
}
pub(crate) use header_lua;

/// Runs `work` as a task of its own and waits for it: cancelling the wait
/// does not cancel the work, so a step that takes holds always ends with
/// them stored where they belong (or released).
pub(crate) async fn detached<R: Send + 'static>(
    work: impl std::future::Future<Output = Result<R>> + Send + 'static,
) -> Result<R> {
    match tokio::spawn(work).await {
        Ok(result) => result,
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        Err(_) => Err(Error::Closed),
    }
}

/// Which keys a stored value refers to, and who holds them for it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct Refs {
    pub(crate) holder: String,
    pub(crate) keys: Vec<String>,
}

/// A value encoded for a primitive, with the futures found in it.
pub(crate) struct Encoded {
    pub(crate) bytes: Vec<u8>,
    /// Kept alive until the primitive's hold is taken.
    pub(crate) futures: Vec<TaskFuture<()>>,
}

impl Encoded {
    /// Whether the value refers to any future.
    pub(crate) fn holds(&self) -> bool {
        !self.futures.is_empty()
    }

    pub(crate) fn refs(&self, holder: String) -> Refs {
        Refs {
            holder,
            keys: self.futures.iter().map(|f| f.key().to_owned()).collect(),
        }
    }

    /// The form stored in Redis: the plain encoding, or (when the value
    /// holds futures) the mark, the length of the header, the header
    /// (`refs`) and the encoding.
    pub(crate) fn stored(&self, refs: Option<&Refs>) -> Vec<u8> {
        let Some(refs) = refs else {
            return self.bytes.clone();
        };
        let header = rmp_serde::to_vec(refs).expect("refs encode");
        let mut out = Vec::with_capacity(5 + header.len() + self.bytes.len());
        out.push(MARK);
        out.extend_from_slice(&(header.len() as u32).to_be_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(&self.bytes);
        out
    }
}

/// Encodes a value for a primitive, recording the futures in it.
pub(crate) fn encode<T: Serialize + ?Sized>(
    client: &Client,
    what: &str,
    value: &T,
) -> Result<Encoded> {
    let (bytes, found) = capture::collecting(|| super::encode(client, what, value));
    let futures: Vec<TaskFuture<()>> = found
        .into_iter()
        .map(|future| TaskFuture::from_state(future.state, future.client))
        .collect();
    let bytes = bytes?;
    for future in &futures {
        let foreign = future.client.names.namespace() != client.names().namespace();
        if foreign {
            return Err(Error::Encode {
                what: what.to_owned(),
                message: format!(
                    "future `{}` belongs to namespace `{}`, not `{}`",
                    future.key(),
                    future.client.names.namespace(),
                    client.names().namespace()
                ),
            });
        }
        if let Some(error) = future.state.never_submitted() {
            return Err(Error::Encode {
                what: what.to_owned(),
                message: format!(
                    "future `{}` failed before it was submitted: {error}",
                    future.key()
                ),
            });
        }
    }
    Ok(Encoded { bytes, futures })
}

/// A stored value, split into its header (if it holds futures) and its
/// encoding.
pub(crate) fn parse<'a>(what: &str, stored: &'a [u8]) -> Result<(Option<Refs>, &'a [u8])> {
    if stored.first() != Some(&MARK) {
        return Ok((None, stored));
    }
    let broken = |message: String| Error::Decode {
        key: what.to_owned(),
        type_name: "stored value with futures",
        message,
    };
    let length = stored
        .get(1..5)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or_else(|| broken("truncated header".into()))?;
    let header = stored
        .get(5..5 + length)
        .ok_or_else(|| broken("truncated header".into()))?;
    let refs: Refs = rmp_serde::from_slice(header).map_err(|e| broken(e.to_string()))?;
    Ok((Some(refs), &stored[5 + length..]))
}

/// Takes each holder's hold on the keys of its value's futures, after
/// sending what the futures' clients still have queued (their submissions
/// reach the scheduler before anyone else can learn the keys).
pub(crate) async fn hold(client: &Client, values: &[(&Encoded, &Refs)]) -> Result<()> {
    let mut clients: Vec<Client> = Vec::new();
    for future in values.iter().flat_map(|(encoded, _)| &encoded.futures) {
        if !clients
            .iter()
            .any(|c| Arc::ptr_eq(&c.inner, &future.client))
        {
            clients.push(Client {
                inner: future.client.clone(),
                trace: None,
            });
        }
    }
    for submitter in &clients {
        submitter.flush().await?;
    }
    let (holds, _) = for_holders(client, Hold::Take, values.iter().map(|(_, refs)| *refs));
    if let Err(error) = holds.exec().await {
        // Best effort: drop what was taken before the failure.
        let taken: Vec<&Refs> = values.iter().map(|(_, refs)| *refs).collect();
        let _ = release_all(client, &taken).await;
        return Err(error.into());
    }
    Ok(())
}

/// Whether [`for_holders`] takes or drops holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hold {
    Take,
    Drop,
}

/// A store batch taking or dropping a hold on every key of each value's
/// futures, on behalf of the value's holder; with the keys, in order.
fn for_holders<'a>(
    client: &Client,
    hold: Hold,
    values: impl IntoIterator<Item = &'a Refs>,
) -> (StoreBatch, Vec<&'a String>) {
    let mut batch = client.inner.store.batch();
    let mut keys = Vec::new();
    for refs in values {
        for key in &refs.keys {
            match hold {
                Hold::Take => batch.hold(key, &refs.holder),
                Hold::Drop => batch.release(key, &refs.holder),
            };
            keys.push(key);
        }
    }
    (batch, keys)
}

/// Drops the holds of values that left the primitive; tells the scheduler
/// about keys nobody holds any more (a task nobody wants is cancelled).
pub(crate) async fn release_all(client: &Client, values: &[&Refs]) -> Result<()> {
    let (releases, keys) = for_holders(client, Hold::Drop, values.iter().copied());
    if keys.is_empty() {
        return Ok(());
    }
    let freed = releases.exec().await?;
    let forgotten: Vec<String> = keys
        .into_iter()
        .zip(freed)
        .filter(|(_, freed)| *freed == Reply::Released { freed: true })
        .map(|(key, _)| key.clone())
        .collect();
    if !forgotten.is_empty() {
        client.inner.send(Op::Forget(forgotten));
    }
    Ok(())
}

/// Drops the holds of a value that left the primitive.
pub(crate) async fn release(client: &Client, refs: &Refs) -> Result<()> {
    release_all(client, &[refs]).await
}

/// How a reader takes over a value's keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Takeover {
    /// Hold while the value's holder still does (a variable, which may be
    /// replaced meanwhile); the value's holder keeps its holds.
    WhileHeld,
    /// Hold, then drop the value's holds (a queue item, now only ours).
    HandOver,
}

/// The reader's holds on a value's keys: its client's future states.
pub(crate) struct Adopted {
    states: HashMap<String, Arc<FutureState>>,
}

/// Makes the reader's client hold every key of `values` (the headers of
/// the values read). `None` when, with [`Takeover::WhileHeld`], a value's
/// holder let go first (read again).
pub(crate) async fn adopt(
    client: &Client,
    values: &[&Refs],
    takeover: Takeover,
) -> Result<Option<Adopted>> {
    let mut states = HashMap::new();
    let mut fresh = Vec::new();
    for key in values.iter().flat_map(|refs| &refs.keys) {
        if states.contains_key(key) {
            continue;
        }
        let (state, new) = client.inner.register(key);
        if new {
            fresh.push(key.clone());
        }
        states.insert(key.clone(), state);
    }
    // A release of an earlier handle of one of the keys may still be queued
    // (also when another reader of this client registered it just before
    // us): it must not run after the holds below and undo them.
    client.flush().await?;
    let id = client.id();
    let mut holds = client.inner.store.batch();
    for refs in values {
        for key in &refs.keys {
            match takeover {
                Takeover::WhileHeld => holds.hold_if_held(key, id, &refs.holder),
                Takeover::HandOver => holds.hold(key, id).release(key, &refs.holder),
            };
        }
    }
    let replies = holds.exec().await;
    for key in fresh {
        // Hear about the task's completion. Also when this reader gives up:
        // another reader of this client may share the state and not know
        // that it is new. (The hold this takes again is released with the
        // state, after it.)
        client.inner.send(Op::Hold(key));
    }
    let replies = replies?;
    if takeover == Takeover::WhileHeld && replies.contains(&Reply::Held(Held::NotTaken)) {
        // Dropping the states releases what was taken.
        return Ok(None);
    }
    Ok(Some(Adopted { states }))
}

/// Decodes a value read from a primitive; its futures come out as futures of
/// `client` (held through `adopted`).
pub(crate) fn decode<T: DeserializeOwned>(
    client: &Client,
    what: &str,
    bytes: &[u8],
    adopted: Option<Adopted>,
    runtime: Option<Arc<tokio::runtime::Runtime>>,
) -> Result<T> {
    let resolver = Resolver {
        client: client.inner.clone(),
        states: adopted.map(|a| a.states).unwrap_or_default(),
        runtime,
    };
    capture::resolving(resolver, || super::decode(what, bytes))
}

/// Reads a variable's stored value, taking the reader's holds while the
/// value's own are still there. `None` when it was replaced meanwhile.
pub(crate) async fn read_held<T: DeserializeOwned>(
    client: &Client,
    what: &str,
    stored: &[u8],
    runtime: Option<Arc<tokio::runtime::Runtime>>,
) -> Result<Option<T>> {
    let (refs, bytes) = parse(what, stored)?;
    let adopted = match refs {
        None => None,
        Some(refs) => match adopt(client, &[&refs], Takeover::WhileHeld).await? {
            Some(adopted) => Some(adopted),
            None => return Ok(None),
        },
    };
    decode(client, what, bytes, adopted, runtime).map(Some)
}

/// Where items taken off a queue go back to when their getter is
/// cancelled before it has them.
#[derive(Clone)]
pub(crate) struct GiveBack {
    /// The queue's list.
    pub(crate) items: String,
    /// The queue's marker of items with futures.
    pub(crate) marker: String,
}

/// Items taken off a queue, with the getter's holds on their futures.
pub(crate) struct Taken {
    pub(crate) items: Vec<Vec<u8>>,
    headers: Vec<Refs>,
    adopted: Option<Adopted>,
}

impl Taken {
    /// Takes over the futures of items just taken off a queue (now only
    /// ours): the reader's client holds them, the items no longer do.
    pub(crate) async fn take_over(
        client: &Client,
        what: &str,
        items: Vec<Vec<u8>>,
    ) -> Result<Taken> {
        let headers: Vec<Refs> = items
            .iter()
            .filter_map(|item| parse(what, item).map(|(refs, _)| refs).transpose())
            .collect::<Result<_>>()?;
        let adopted = if headers.is_empty() {
            None
        } else {
            let refs: Vec<&Refs> = headers.iter().collect();
            adopt(client, &refs, Takeover::HandOver).await?
        };
        Ok(Taken {
            items,
            headers,
            adopted,
        })
    }

    /// Puts the items back at the head of their queue, in order, held by
    /// the queue again (before the reader's holds go with `self`).
    pub(crate) async fn put_back(self, client: &Client, give_back: &GiveBack) -> Result<()> {
        if self.items.is_empty() {
            return Ok(());
        }
        let headers: &[Refs] = if self.adopted.is_some() {
            &self.headers
        } else {
            &[]
        };
        put_back(client, headers, &self.items, give_back).await
    }

    /// Decodes the items in order; their futures are the reader's.
    pub(crate) fn decode<T: DeserializeOwned>(
        &self,
        client: &Client,
        what: &str,
        runtime: Option<Arc<tokio::runtime::Runtime>>,
    ) -> Result<Vec<T>> {
        self.items
            .iter()
            .map(|item| {
                let (_, bytes) = parse(what, item)?;
                let adopted = self.adopted.as_ref().map(|a| Adopted {
                    states: a.states.clone(),
                });
                decode(client, what, bytes, adopted, runtime.clone())
            })
            .collect()
    }
}

/// Puts items back at the head of their queue, in order, with their holds.
async fn put_back(
    client: &Client,
    headers: &[Refs],
    items: &[Vec<u8>],
    give_back: &GiveBack,
) -> Result<()> {
    if !headers.is_empty() {
        let (holds, _) = for_holders(client, Hold::Take, headers);
        holds.exec().await?;
    }
    // Apart from the scripts: a pipeline retried after `NOSCRIPT` must not
    // push the items twice.
    let mut push = redis::cmd("LPUSH");
    push.arg(&give_back.items);
    for item in items.iter().rev() {
        push.arg(item);
    }
    redis::pipe()
        .cmd("SET")
        .arg(&give_back.marker)
        .arg(1)
        .ignore()
        .add_command(push)
        .ignore()
        .query_async::<()>(&mut client.redis())
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{parse, Encoded, Refs, MARK};

    #[test]
    fn stored_values_split_into_header_and_encoding() {
        let encoded = Encoded {
            bytes: rmp_serde::to_vec(&(1, "two")).unwrap(),
            futures: Vec::new(),
        };
        let refs = Refs {
            holder: "q:jobs:1".into(),
            keys: vec!["a-1".into(), "b-2".into()],
        };
        let stored = encoded.stored(Some(&refs));
        assert_eq!(stored[0], MARK);
        let (header, bytes) = parse("test", &stored).unwrap();
        let header = header.expect("a header");
        assert_eq!(header.holder, "q:jobs:1");
        assert_eq!(header.keys, ["a-1", "b-2"]);
        assert_eq!(bytes, encoded.bytes);
        // What the scripts hand back is the header alone.
        let (again, rest) = parse("test", &stored[..stored.len() - bytes.len()]).unwrap();
        assert_eq!(again.unwrap().keys, header.keys);
        assert!(rest.is_empty());

        let plain = encoded.stored(None);
        assert_eq!(plain, encoded.bytes);
        let (none, bytes) = parse("test", &plain).unwrap();
        assert!(none.is_none());
        assert_eq!(bytes, plain);
        assert!(parse("test", &stored[..3]).is_err(), "a truncated header");
    }
}
