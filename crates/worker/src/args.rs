//! Assembling a task's argument tuple from values and the results of its
//! inputs: each `Arg::Ref` is replaced by the stored bytes of the result it
//! names, each `Arg::List` becomes a MessagePack array.

use flotilla_proto::{Arg, ErrorKind, TaskError};
use std::collections::HashMap;

/// Builds the MessagePack array of a task's arguments.
///
/// `args` is the MessagePack of `Vec<Arg>` from the task spec; `inputs`
/// holds the encoded result of every key the arguments refer to.
pub(crate) fn assemble(
    args: &[u8],
    inputs: &HashMap<String, std::sync::Arc<Vec<u8>>>,
) -> Result<Vec<u8>, TaskError> {
    let args: Vec<Arg> = rmp_serde::from_slice(args).map_err(|error| {
        TaskError::new(
            ErrorKind::BadArguments,
            "flotilla::BadArguments",
            format!("the task's argument list is malformed: {error}"),
        )
    })?;
    let mut out = Vec::with_capacity(64);
    write_list(&mut out, &args, inputs)?;
    Ok(out)
}

fn write_list(
    out: &mut Vec<u8>,
    items: &[Arg],
    inputs: &HashMap<String, std::sync::Arc<Vec<u8>>>,
) -> Result<(), TaskError> {
    let len = u32::try_from(items.len()).map_err(|_| too_many())?;
    rmp::encode::write_array_len(out, len).map_err(|_| too_many())?;
    for item in items {
        match item {
            Arg::Value(bytes) => out.extend_from_slice(bytes),
            Arg::Ref(key) => match inputs.get(key) {
                Some(bytes) => out.extend_from_slice(bytes),
                None => {
                    return Err(TaskError::new(
                        ErrorKind::MissingDependency,
                        "flotilla::MissingDependency",
                        format!(
                        "input `{key}` has no stored result: it was released or never submitted"
                    ),
                    ))
                }
            },
            Arg::List(items) => write_list(out, items, inputs)?,
        }
    }
    Ok(())
}

fn too_many() -> TaskError {
    TaskError::new(
        ErrorKind::BadArguments,
        "flotilla::BadArguments",
        "too many arguments",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value<T: serde::Serialize>(v: &T) -> Arg {
        Arg::Value(rmp_serde::to_vec_named(v).unwrap())
    }

    #[test]
    fn values_refs_and_lists_assemble_into_the_tuple() {
        let args = vec![
            value(&1i64),
            Arg::Ref("a".into()),
            Arg::List(vec![Arg::Ref("a".into()), value(&5i64)]),
        ];
        let spec = rmp_serde::to_vec(&args).unwrap();
        let inputs = HashMap::from([(
            "a".to_string(),
            std::sync::Arc::new(rmp_serde::to_vec(&7i64).unwrap()),
        )]);
        let bytes = assemble(&spec, &inputs).unwrap();
        let decoded: (i64, i64, Vec<i64>) = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(decoded, (1, 7, vec![7, 5]));
    }

    #[test]
    fn a_missing_input_is_an_error() {
        let spec = rmp_serde::to_vec(&vec![Arg::Ref("gone".into())]).unwrap();
        let error = assemble(&spec, &HashMap::new()).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::MissingDependency);
        assert!(assemble(b"\xc1", &HashMap::new()).is_err());
    }
}
