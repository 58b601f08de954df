//! Reading a task function's signature: whether it takes the context, which
//! parameters are the worker's shared state (`State<T>`), which are the
//! task's arguments, and what the task outputs.
//!
//! Everything a task cannot support is rejected here, with an error spanned on
//! the offending part of the signature, so the user sees why before the
//! compiler gets to the generated code.

use syn::visit::{self, Visit};
use syn::{FnArg, ReturnType, Signature, Type};

/// The name of the context type, matched on the last path segment so that
/// `TaskContext`, `flotilla::TaskContext` and re-exports all work.
const CONTEXT_TYPE: &str = "TaskContext";

/// The name of the shared-state type, matched on the last path segment with
/// one generic type argument (`State<Pool>`, `flotilla::State<Pool>`).
const STATE_TYPE: &str = "State";

/// A task function's signature, checked and classified.
pub(crate) struct TaskSignature<'a> {
    /// Types of the parameters that make up the task's arguments, in order.
    pub(crate) arg_types: Vec<&'a Type>,
    /// Every parameter, in order, by what fills it.
    pub(crate) params: Vec<Param<'a>>,
    /// What the task sends back.
    pub(crate) output: TaskOutput<'a>,
}

#[cfg(test)]
impl TaskSignature<'_> {
    /// The first parameter is a `TaskContext`.
    pub(crate) fn takes_context(&self) -> bool {
        matches!(self.params.first(), Some(Param::Context))
    }
}

/// What fills a parameter of the task function when a worker calls it.
pub(crate) enum Param<'a> {
    /// The task context (the first parameter).
    Context,
    /// The worker's shared value of this type, from a `State<T>` parameter.
    State(&'a Type),
    /// The task argument at this index of the argument tuple.
    Argument(usize),
}

/// What a task sends back, decided by its declared return type.
pub(crate) enum TaskOutput<'a> {
    /// No return type, or `()`.
    Unit,
    /// Any other type, sent back as it is.
    Value(&'a Type),
    /// A type whose last path segment is `Result`: `Ok` is the output, `Err`
    /// becomes a task error.
    Fallible(&'a Type),
}

impl<'a> TaskOutput<'a> {
    /// Classifies a function's return type.
    pub(crate) fn classify(output: &'a ReturnType) -> Self {
        match output {
            ReturnType::Default => TaskOutput::Unit,
            ReturnType::Type(_, ty) => match strip_grouping(ty) {
                Type::Tuple(tuple) if tuple.elems.is_empty() => TaskOutput::Unit,
                inner if last_segment_is(inner, "Result") => TaskOutput::Fallible(ty),
                _ => TaskOutput::Value(ty),
            },
        }
    }
}

/// Checks `sig` and splits it into context, arguments and output.
///
/// All problems are reported together, each spanned on its cause.
pub(crate) fn analyze(sig: &Signature) -> syn::Result<TaskSignature<'_>> {
    let mut errors = Vec::new();

    if let Some(unsafety) = &sig.unsafety {
        errors.push(syn::Error::new(
            unsafety.span,
            "`#[flotilla::task]` cannot be applied to an `unsafe fn`: workers call tasks \
             without knowing their safety conditions; make the task safe and use `unsafe` \
             blocks inside it",
        ));
    }
    if !sig.generics.params.is_empty() {
        errors.push(syn::Error::new_spanned(
            &sig.generics,
            "`#[flotilla::task]` functions cannot be generic: a task is registered under one \
             name with one concrete signature; write a non-generic task for each type you need",
        ));
    }
    if let Some(variadic) = &sig.variadic {
        errors.push(syn::Error::new_spanned(
            variadic,
            "`#[flotilla::task]` functions cannot be variadic: a task's arguments are a \
             fixed tuple",
        ));
    }

    let mut arg_types = Vec::new();
    let mut params = Vec::new();
    for (index, input) in sig.inputs.iter().enumerate() {
        let param = match input {
            FnArg::Receiver(receiver) => {
                errors.push(syn::Error::new_spanned(
                    receiver,
                    "`#[flotilla::task]` must be applied to a free function, not a method: \
                     a task has no `self`; move the function out of the `impl` block",
                ));
                continue;
            }
            FnArg::Typed(param) => param,
        };
        let ty = &*param.ty;
        if is_context(ty) {
            if index == 0 {
                params.push(Param::Context);
            } else {
                errors.push(syn::Error::new_spanned(
                    param,
                    "the `TaskContext` parameter must be the first parameter of a \
                     `#[flotilla::task]` function",
                ));
            }
            continue;
        }
        if let Some(state) = state_type(ty) {
            params.push(Param::State(state));
            continue;
        }
        if let Type::Reference(reference) = strip_grouping(ty) {
            if state_type(&reference.elem).is_some() {
                errors.push(syn::Error::new_spanned(
                    param,
                    "`#[flotilla::task]` takes the worker's state by value: \
                     write `pool: State<Pool>`, not a reference (it is a shared reference already)",
                ));
                continue;
            }
            if is_context(&reference.elem) {
                errors.push(syn::Error::new_spanned(
                    param,
                    "`#[flotilla::task]` takes the task context by value: \
                     write `ctx: TaskContext`, not a reference",
                ));
                continue;
            }
        }
        let mut checker = TypeChecker {
            position: Position::Argument,
            errors: &mut errors,
        };
        checker.visit_type(ty);
        params.push(Param::Argument(arg_types.len()));
        arg_types.push(ty);
    }

    if let ReturnType::Type(_, ty) = &sig.output {
        let mut checker = TypeChecker {
            position: Position::Return,
            errors: &mut errors,
        };
        checker.visit_type(ty);
    }

    match errors.into_iter().reduce(|mut all, error| {
        all.combine(error);
        all
    }) {
        Some(error) => Err(error),
        None => Ok(TaskSignature {
            arg_types,
            params,
            output: TaskOutput::classify(&sig.output),
        }),
    }
}

/// Whether `sig` has a part (a `self` receiver or `...`) that makes the
/// function invalid as a free function; the original item is then not
/// re-emitted after an error, to avoid a second, less helpful, error.
pub(crate) fn is_unusable_as_free_fn(sig: &Signature) -> bool {
    sig.variadic.is_some() || sig.receiver().is_some()
}

/// `ty` is the task context, by value.
fn is_context(ty: &Type) -> bool {
    last_segment_is(strip_grouping(ty), CONTEXT_TYPE)
}

/// The `T` of a `State<T>` parameter type (a path whose last segment is
/// `State` with exactly one generic type argument).
fn state_type(ty: &Type) -> Option<&Type> {
    let Type::Path(path) = strip_grouping(ty) else {
        return None;
    };
    if path.qself.is_some() {
        return None;
    }
    let segment = path.path.segments.last()?;
    if segment.ident != STATE_TYPE {
        return None;
    }
    let syn::PathArguments::AngleBracketed(generics) = &segment.arguments else {
        return None;
    };
    match generics.args.iter().collect::<Vec<_>>()[..] {
        [syn::GenericArgument::Type(inner)] => Some(inner),
        _ => None,
    }
}

/// `ty` is a path (without `<T as Trait>::` qualification) whose last
/// segment is the identifier `name`.
fn last_segment_is(ty: &Type, name: &str) -> bool {
    match ty {
        Type::Path(path) if path.qself.is_none() => path
            .path
            .segments
            .last()
            .is_some_and(|segment| segment.ident == name),
        _ => false,
    }
}

/// Looks through parentheses and the invisible groups that `macro_rules!`
/// puts around `$t:ty` fragments.
fn strip_grouping(mut ty: &Type) -> &Type {
    loop {
        match ty {
            Type::Group(group) => ty = &group.elem,
            Type::Paren(paren) => ty = &paren.elem,
            _ => return ty,
        }
    }
}

/// Where a type appears in the signature.
#[derive(Clone, Copy)]
enum Position {
    /// A task argument: decoded from bytes in another process.
    Argument,
    /// The return type: encoded and sent back to the client.
    Return,
}

/// Walks a type and reports the parts a task cannot carry.
struct TypeChecker<'e> {
    position: Position,
    errors: &'e mut Vec<syn::Error>,
}

impl<'ast> Visit<'ast> for TypeChecker<'_> {
    fn visit_type_impl_trait(&mut self, node: &'ast syn::TypeImplTrait) {
        let message = match self.position {
            Position::Argument => {
                "`#[flotilla::task]` arguments cannot use `impl Trait`: a task has one \
                 concrete signature; name the type instead"
            }
            Position::Return => {
                "`#[flotilla::task]` return types cannot use `impl Trait`: the output is sent \
                 to the client, which needs its concrete type; name the type instead \
                 (or write an `async fn` instead of returning `impl Future`)"
            }
        };
        self.errors.push(syn::Error::new_spanned(node, message));
    }

    fn visit_type_reference(&mut self, node: &'ast syn::TypeReference) {
        match self.position {
            Position::Argument => self.errors.push(syn::Error::new_spanned(
                node,
                "`#[flotilla::task]` arguments are decoded from bytes sent by the client, so \
                 they must be owned types: use `String` instead of `&str`, `Vec<T>` instead \
                 of `&[T]`",
            )),
            Position::Return => visit::visit_type_reference(self, node),
        }
    }

    fn visit_type_bare_fn(&mut self, _node: &'ast syn::TypeBareFn) {
        // A function pointer's own parameters are not the task's concern.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use syn::parse_quote;

    use quote::ToTokens;

    fn errors_of(sig: Signature) -> Vec<String> {
        match analyze(&sig) {
            Ok(_) => panic!("the signature should be rejected"),
            Err(errors) => errors.into_iter().map(|error| error.to_string()).collect(),
        }
    }

    fn analyze_ok(sig: &Signature) -> TaskSignature<'_> {
        match analyze(sig) {
            Ok(task) => task,
            Err(error) => panic!("the signature should be accepted: {error}"),
        }
    }

    fn type_strings(types: &[&Type]) -> Vec<String> {
        types
            .iter()
            .map(|ty| ty.to_token_stream().to_string())
            .collect()
    }

    #[test]
    fn classify_no_return_type_or_unit() {
        assert!(matches!(
            TaskOutput::classify(&ReturnType::Default),
            TaskOutput::Unit
        ));
        let unit: ReturnType = parse_quote!(-> ());
        assert!(matches!(TaskOutput::classify(&unit), TaskOutput::Unit));
    }

    #[test]
    fn classify_results_as_fallible() {
        for output in [
            parse_quote!(-> Result<i64, String>),
            parse_quote!(-> std::io::Result<u8>),
            parse_quote!(-> anyhow::Result<Vec<u8>>),
            parse_quote!(-> ::core::result::Result<(), E>),
            parse_quote!(-> (Result<i64, String>)),
        ] {
            let output: ReturnType = output;
            assert!(
                matches!(TaskOutput::classify(&output), TaskOutput::Fallible(_)),
                "{}",
                output.to_token_stream()
            );
        }
    }

    #[test]
    fn classify_other_types_as_values() {
        for output in [
            parse_quote!(-> i64),
            parse_quote!(-> Option<Result<i64, String>>),
            parse_quote!(-> Vec<Result<i64, String>>),
            parse_quote!(-> (i64, Result<i64, String>)),
            parse_quote!(-> <T as Trait>::Result),
            parse_quote!(-> MyResult),
        ] {
            let output: ReturnType = output;
            assert!(
                matches!(TaskOutput::classify(&output), TaskOutput::Value(_)),
                "{}",
                output.to_token_stream()
            );
        }
    }

    #[test]
    fn context_first_is_not_an_argument() {
        let sig: Signature = parse_quote!(fn f(ctx: flotilla::TaskContext, x: i64, y: String));
        let task = analyze_ok(&sig);
        assert!(task.takes_context());
        assert_eq!(type_strings(&task.arg_types), ["i64", "String"]);
    }

    #[test]
    fn state_parameters_are_not_arguments() {
        let sig: Signature = parse_quote!(
            fn f(ctx: TaskContext, x: i64, pool: flotilla::State<Pool>, y: String, n: State<u8>)
        );
        let task = analyze_ok(&sig);
        assert!(task.takes_context());
        assert_eq!(type_strings(&task.arg_types), ["i64", "String"]);
        let order: Vec<String> = task
            .params
            .iter()
            .map(|param| match param {
                Param::Context => "ctx".to_owned(),
                Param::State(ty) => format!("state {}", ty.to_token_stream()),
                Param::Argument(index) => format!("arg {index}"),
            })
            .collect();
        assert_eq!(order, ["ctx", "arg 0", "state Pool", "arg 1", "state u8"]);
        // Without exactly one type argument, `State` is an ordinary type.
        let sig: Signature = parse_quote!(fn f(s: State, t: State<A, B>, u: state::State<'static>));
        let task = analyze_ok(&sig);
        assert_eq!(task.arg_types.len(), 3);
    }

    #[test]
    fn state_by_reference_is_rejected() {
        let sig: Signature = parse_quote!(fn f(pool: &State<Pool>));
        assert!(errors_of(sig)[0].contains("takes the worker's state by value"));
    }

    #[test]
    fn patterns_are_accepted() {
        let sig: Signature = parse_quote!(fn f(mut x: i64, (a, b): (i32, i32), _: u8));
        let task = analyze_ok(&sig);
        assert!(!task.takes_context());
        assert_eq!(task.arg_types.len(), 3);
    }

    #[test]
    fn no_parameters() {
        let sig: Signature = parse_quote!(async fn f() -> u8);
        let task = analyze_ok(&sig);
        assert!(!task.takes_context());
        assert!(task.arg_types.is_empty());
    }

    #[test]
    fn context_elsewhere_is_rejected() {
        let sig: Signature = parse_quote!(fn f(x: i64, ctx: TaskContext));
        assert_eq!(
            errors_of(sig),
            [
                "the `TaskContext` parameter must be the first parameter of a \
              `#[flotilla::task]` function"
            ]
        );
    }

    #[test]
    fn context_by_reference_is_rejected() {
        let sig: Signature = parse_quote!(fn f(ctx: &TaskContext, x: i64));
        assert!(errors_of(sig)[0].contains("takes the task context by value"));
    }

    #[test]
    fn generics_are_rejected() {
        let sig: Signature = parse_quote!(fn f<T: Clone>(x: T) -> T);
        assert!(errors_of(sig)[0].contains("cannot be generic"));
        let sig: Signature = parse_quote!(fn f<'a>(x: i64) -> i64);
        assert!(errors_of(sig)[0].contains("cannot be generic"));
    }

    #[test]
    fn receivers_are_rejected() {
        let sig: Signature = parse_quote!(fn f(&self, x: i64));
        assert!(errors_of(sig)[0].contains("not a method"));
        assert!(is_unusable_as_free_fn(&parse_quote!(fn f(self))));
        assert!(!is_unusable_as_free_fn(&parse_quote!(fn f(x: i64))));
    }

    #[test]
    fn unsafe_fns_are_rejected() {
        let sig: Signature = parse_quote!(unsafe fn f(x: i64));
        assert!(errors_of(sig)[0].contains("`unsafe fn`"));
    }

    #[test]
    fn impl_trait_is_rejected() {
        let sig: Signature = parse_quote!(fn f(x: impl Into<i64>));
        assert!(errors_of(sig)[0].contains("arguments cannot use `impl Trait`"));
        let sig: Signature = parse_quote!(fn f(x: Vec<impl Into<i64>>));
        assert!(errors_of(sig)[0].contains("arguments cannot use `impl Trait`"));
        let sig: Signature = parse_quote!(fn f() -> impl std::future::Future<Output = u8>);
        assert!(errors_of(sig)[0].contains("return types cannot use `impl Trait`"));
    }

    #[test]
    fn borrowed_arguments_are_rejected() {
        let sig: Signature = parse_quote!(fn f(x: &str));
        assert!(errors_of(sig)[0].contains("must be owned types"));
        let sig: Signature = parse_quote!(fn f(x: Vec<&'static str>));
        assert!(errors_of(sig)[0].contains("must be owned types"));
        let sig: Signature = parse_quote!(fn f(x: fn(&str) -> usize) -> &'static str);
        analyze_ok(&sig);
    }

    #[test]
    fn all_errors_are_reported_together() {
        let sig: Signature = parse_quote!(fn f<T>(x: T, ctx: TaskContext, y: impl Copy));
        assert_eq!(errors_of(sig).len(), 3);
    }
}
