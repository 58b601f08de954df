//! A task's argument list, read from its spec and checked against the
//! inputs loaded for it. The list is decoded in place by
//! [`flotilla_task::Arguments::parts`]: no buffer holding every input is
//! assembled.

use bytes::Bytes;
use flotilla_proto::{Arg, ErrorKind, TaskError};
use std::collections::HashMap;

/// Reads a task's argument list (the MessagePack of `Vec<Arg>` from its
/// spec) and checks that every `Arg::Ref` in it has its input in `inputs`.
pub(crate) fn read(args: &[u8], inputs: &HashMap<String, Bytes>) -> Result<Vec<Arg>, TaskError> {
    let args: Vec<Arg> = rmp_serde::from_slice(args).map_err(|error| {
        TaskError::new(
            ErrorKind::BadArguments,
            "flotilla::BadArguments",
            format!("the task's argument list is malformed: {error}"),
        )
    })?;
    check(&args, inputs)?;
    Ok(args)
}

fn check(items: &[Arg], inputs: &HashMap<String, Bytes>) -> Result<(), TaskError> {
    for item in items {
        match item {
            Arg::Value(_) => {}
            Arg::Ref(key) if inputs.contains_key(key) => {}
            Arg::Ref(key) => {
                return Err(TaskError::new(
                    ErrorKind::MissingDependency,
                    "flotilla::MissingDependency",
                    format!(
                        "input `{key}` has no stored result: it was released or never submitted"
                    ),
                ))
            }
            Arg::List(items) => check(items, inputs)?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_argument_list_with_its_inputs_is_read() {
        let args = vec![
            Arg::Value(rmp_serde::to_vec(&1i64).unwrap()),
            Arg::Ref("a".into()),
            Arg::List(vec![Arg::Ref("a".into())]),
        ];
        let spec = rmp_serde::to_vec(&args).unwrap();
        let inputs = HashMap::from([("a".to_string(), Bytes::from_static(b"\x07"))]);
        assert_eq!(read(&spec, &inputs).unwrap(), args);
    }

    #[test]
    fn a_missing_input_is_an_error() {
        let nested = vec![Arg::List(vec![Arg::Ref("gone".into())])];
        let spec = rmp_serde::to_vec(&nested).unwrap();
        let error = read(&spec, &HashMap::new()).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::MissingDependency);
        assert!(error.message().contains("gone"));
        let error = read(b"\xc1", &HashMap::new()).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::BadArguments);
    }
}
