//! How task arguments are written: a value, or a future of that value's
//! type (also inside a `Vec`), wherever the task takes a `T`.
//!
//! ```no_run
//! # use flotilla::prelude::*;
//! # #[flotilla::task] fn add(x: i64, y: i64) -> i64 { x + y }
//! # #[flotilla::task] fn total(xs: Vec<i64>) -> i64 { xs.iter().sum() }
//! # async fn demo(client: Client) -> flotilla::Result<()> {
//! let a = client.submit(add, (1, 2));
//! let b = client.submit(add, (&a, 10));           // waits for `a`
//! let parts = client.map(add, (0..4).map(|i| (i, i)));
//! let sum = client.submit(total, (parts,));       // Vec<TaskFuture<i64>> arrives as Vec<i64>
//! # Ok(()) }
//! ```

use crate::{Error, FutureRef, TaskFuture};
use flotilla_proto::Arg;
use serde::Serialize;

/// Collects what a submission's arguments refer to.
#[derive(Debug, Default)]
pub struct ArgWriter {
    pub(crate) deps: Vec<String>,
    pub(crate) holds: Vec<String>,
    /// The inputs' states, kept alive until the submission is queued.
    keep: Vec<std::sync::Arc<crate::future::FutureState>>,
}

impl ArgWriter {
    fn reference<T>(&mut self, future: &TaskFuture<T>) -> Arg {
        let key = future.key();
        if !self.deps.iter().any(|d| d == key) {
            self.deps.push(key.to_owned());
            self.keep.push(future.state.clone());
        }
        Arg::Ref(key.to_owned())
    }

    /// Encodes a plain value.
    pub fn value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<Arg, Error> {
        rmp_serde::to_vec_named(value)
            .map(Arg::Value)
            .map_err(|e| Error::Encode {
                what: format!("an argument of type {}", std::any::type_name::<T>()),
                message: e.to_string(),
            })
    }
}

/// A value usable where a task takes a `T`: `T` itself, `TaskFuture<T>`,
/// `&TaskFuture<T>`, and for `Vec<T>` also `Vec<TaskFuture<T>>`/`Vec<&TaskFuture<T>>`.
pub trait IntoArg<T> {
    /// Writes the argument.
    fn into_arg(self, writer: &mut ArgWriter) -> Result<Arg, Error>;
}

impl<T: Serialize> IntoArg<T> for T {
    fn into_arg(self, writer: &mut ArgWriter) -> Result<Arg, Error> {
        writer.value(&self)
    }
}

impl IntoArg<String> for &str {
    fn into_arg(self, writer: &mut ArgWriter) -> Result<Arg, Error> {
        writer.value(self)
    }
}

impl<T> IntoArg<T> for TaskFuture<T> {
    fn into_arg(self, writer: &mut ArgWriter) -> Result<Arg, Error> {
        Ok(writer.reference(&self))
    }
}

impl<T> IntoArg<T> for &TaskFuture<T> {
    fn into_arg(self, writer: &mut ArgWriter) -> Result<Arg, Error> {
        Ok(writer.reference(self))
    }
}

impl<T> IntoArg<Vec<T>> for Vec<TaskFuture<T>> {
    fn into_arg(self, writer: &mut ArgWriter) -> Result<Arg, Error> {
        Ok(Arg::List(
            self.iter().map(|f| writer.reference(f)).collect(),
        ))
    }
}

impl<T> IntoArg<Vec<T>> for &Vec<TaskFuture<T>> {
    fn into_arg(self, writer: &mut ArgWriter) -> Result<Arg, Error> {
        Ok(Arg::List(
            self.iter().map(|f| writer.reference(f)).collect(),
        ))
    }
}

impl<T> IntoArg<Vec<T>> for &[TaskFuture<T>] {
    fn into_arg(self, writer: &mut ArgWriter) -> Result<Arg, Error> {
        Ok(Arg::List(
            self.iter().map(|f| writer.reference(f)).collect(),
        ))
    }
}

impl<T> IntoArg<Vec<T>> for Vec<&TaskFuture<T>> {
    fn into_arg(self, writer: &mut ArgWriter) -> Result<Arg, Error> {
        Ok(Arg::List(
            self.iter().map(|f| writer.reference(*f)).collect(),
        ))
    }
}

impl<T> IntoArg<FutureRef<T>> for &TaskFuture<T> {
    /// Passes the future itself, not its value: the task starts without
    /// waiting for it, and the key is held for the task until it ends.
    fn into_arg(self, writer: &mut ArgWriter) -> Result<Arg, Error> {
        if !writer.holds.iter().any(|k| k == self.key()) {
            writer.holds.push(self.key().to_owned());
            writer.keep.push(self.state.clone());
        }
        writer.value(&self.to_ref())
    }
}

/// A tuple of arguments for a task whose parameters are the tuple `A`.
pub trait IntoArgs<A> {
    /// Writes every argument.
    fn into_args(self, writer: &mut ArgWriter) -> Result<Vec<Arg>, Error>;
}

impl IntoArgs<()> for () {
    fn into_args(self, _: &mut ArgWriter) -> Result<Vec<Arg>, Error> {
        Ok(Vec::new())
    }
}

macro_rules! tuple_args {
    ($($value:ident $param:ident),+) => {
        impl<$($value, $param: IntoArg<$value>),+> IntoArgs<($($value,)+)> for ($($param,)+) {
            #[allow(non_snake_case)]
            fn into_args(self, writer: &mut ArgWriter) -> Result<Vec<Arg>, Error> {
                let ($($param,)+) = self;
                Ok(vec![$($param.into_arg(writer)?),+])
            }
        }
    };
}

tuple_args!(A0 X0);
tuple_args!(A0 X0, A1 X1);
tuple_args!(A0 X0, A1 X1, A2 X2);
tuple_args!(A0 X0, A1 X1, A2 X2, A3 X3);
tuple_args!(A0 X0, A1 X1, A2 X2, A3 X3, A4 X4);
tuple_args!(A0 X0, A1 X1, A2 X2, A3 X3, A4 X4, A5 X5);
tuple_args!(A0 X0, A1 X1, A2 X2, A3 X3, A4 X4, A5 X5, A6 X6);
tuple_args!(A0 X0, A1 X1, A2 X2, A3 X3, A4 X4, A5 X5, A6 X6, A7 X7);
tuple_args!(A0 X0, A1 X1, A2 X2, A3 X3, A4 X4, A5 X5, A6 X6, A7 X7, A8 X8);
tuple_args!(A0 X0, A1 X1, A2 X2, A3 X3, A4 X4, A5 X5, A6 X6, A7 X7, A8 X8, A9 X9);
tuple_args!(A0 X0, A1 X1, A2 X2, A3 X3, A4 X4, A5 X5, A6 X6, A7 X7, A8 X8, A9 X9, A10 X10);
tuple_args!(A0 X0, A1 X1, A2 X2, A3 X3, A4 X4, A5 X5, A6 X6, A7 X7, A8 X8, A9 X9, A10 X10, A11 X11);
