//! `#[flotilla::actor]`: turns an `impl` block into an actor type.
//!
//! For `impl Counter { fn new() -> Self; fn increment(&mut self) -> i64;
//! async fn get_count(&self) -> i64 }` the expansion is:
//!
//! - the `impl` block, unchanged;
//! - `impl ::flotilla::__private::Actor for Counter`: its name, its proxy
//!   type, and a `dispatch` that decodes a call's arguments by method name,
//!   runs the method (sync or async) and encodes its output (a method that
//!   returns `Result` fails the call with its `Err`);
//! - an `inventory` registration per constructor (an associated function
//!   without receiver that returns `Self` or `Counter`), named by the
//!   constructor's `std::any::type_name`, which is how the client names it;
//! - `CounterProxy`, what `client.submit_actor(Counter::new, ())` returns,
//!   with one method per `&self`/`&mut self` method taking the same
//!   arguments by value and returning `flotilla::ActorFuture<Output>`;
//! - `CounterBlockingProxy`, the same for `flotilla::blocking`, whose
//!   methods return `flotilla::blocking::TaskFuture<Output>`.
//!
//! The generated code names the runtime only through `::flotilla::__private`
//! (and the public `::flotilla::TaskFuture` and `::flotilla::blocking::TaskFuture`).

use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote, ToTokens};
use syn::ext::IdentExt;
use syn::visit::{self, Visit};
use syn::{FnArg, Ident, ImplItem, ImplItemFn, Item, ItemImpl, ReturnType, Signature, Type};

/// What a method sends back, decided by its declared return type.
enum Output<'a> {
    /// No return type, or `()`.
    Unit,
    /// Any other type, sent back as it is.
    Value(&'a Type),
    /// A type whose last path segment is `Result`: `Ok` is the output, `Err`
    /// fails the call.
    Fallible(&'a Type),
}

impl<'a> Output<'a> {
    fn classify(output: &'a ReturnType) -> Self {
        match output {
            ReturnType::Default => Output::Unit,
            ReturnType::Type(_, ty) => match strip_grouping(ty) {
                Type::Tuple(tuple) if tuple.elems.is_empty() => Output::Unit,
                inner if last_segment_is(inner, "Result") => Output::Fallible(ty),
                _ => Output::Value(ty),
            },
        }
    }

    /// The type a caller receives.
    fn value_type(&self) -> TokenStream {
        match self {
            Output::Unit => quote!(()),
            Output::Value(ty) => ty.to_token_stream(),
            Output::Fallible(ty) => quote!(<#ty as ::flotilla::__private::ResultOutput>::Ok),
        }
    }
}

/// A method callable through the proxy.
struct Method<'a> {
    func: &'a ImplItemFn,
    arg_types: Vec<&'a Type>,
    output: Output<'a>,
}

/// A constructor: an associated function returning the actor type.
struct ConstructorFn<'a> {
    ident: &'a Ident,
    arg_types: Vec<&'a Type>,
}

/// Expands `#[flotilla::actor(attr)] item`.
pub(crate) fn expand(attr: TokenStream, item: TokenStream) -> TokenStream {
    let block = match syn::parse2::<Item>(item) {
        Ok(Item::Impl(block)) => block,
        Ok(other) => {
            let error = syn::Error::new_spanned(
                &other,
                "`#[flotilla::actor]` can only be applied to an inherent `impl` block \
                 (`impl Counter { .. }`)",
            )
            .into_compile_error();
            return quote!(#error #other);
        }
        Err(error) => return error.into_compile_error(),
    };
    let mut errors = Vec::new();
    if !attr.is_empty() {
        errors.push(syn::Error::new_spanned(
            &attr,
            "`#[flotilla::actor]` takes no arguments",
        ));
    }
    match analyze(&block, &mut errors) {
        Some((ident, constructors, methods)) if errors.is_empty() => {
            generate(&block, ident, &constructors, &methods)
        }
        _ => {
            let errors = errors
                .into_iter()
                .reduce(|mut all, error| {
                    all.combine(error);
                    all
                })
                .map(syn::Error::into_compile_error);
            quote!(#errors #block)
        }
    }
}

type Analysis<'a> = (&'a Ident, Vec<ConstructorFn<'a>>, Vec<Method<'a>>);

/// Checks the block and sorts its functions into constructors and methods.
fn analyze<'a>(block: &'a ItemImpl, errors: &mut Vec<syn::Error>) -> Option<Analysis<'a>> {
    if let Some((_, path, _)) = &block.trait_ {
        errors.push(syn::Error::new_spanned(
            path,
            "`#[flotilla::actor]` goes on the type's inherent `impl` block, not on a trait impl",
        ));
        return None;
    }
    if !block.generics.params.is_empty() {
        errors.push(syn::Error::new_spanned(
            &block.generics,
            "`#[flotilla::actor]` types cannot be generic: an actor is created by name on a \
             worker, with one concrete type",
        ));
        return None;
    }
    let ident = match strip_grouping(&block.self_ty) {
        Type::Path(path)
            if path.qself.is_none()
                && path
                    .path
                    .segments
                    .last()
                    .is_some_and(|s| s.arguments.is_none()) =>
        {
            &path.path.segments.last()?.ident
        }
        other => {
            errors.push(syn::Error::new_spanned(
                other,
                "`#[flotilla::actor]` needs a plain type name (`impl Counter`)",
            ));
            return None;
        }
    };
    let mut constructors = Vec::new();
    let mut methods = Vec::new();
    for item in &block.items {
        let ImplItem::Fn(func) = item else { continue };
        let sig = &func.sig;
        match sig.receiver() {
            None => {
                if returns_the_type(&sig.output, ident) {
                    if let Some(arg_types) = arguments(sig, errors) {
                        constructors.push(ConstructorFn {
                            ident: &sig.ident,
                            arg_types,
                        });
                    }
                }
            }
            Some(receiver) => {
                if receiver.reference.is_none() || receiver.colon_token.is_some() {
                    errors.push(syn::Error::new_spanned(
                        receiver,
                        "actor methods take `&self` or `&mut self`: the actor stays on its \
                         worker, so a method cannot consume it",
                    ));
                    continue;
                }
                if let Some(arg_types) = arguments(sig, errors) {
                    methods.push(Method {
                        func,
                        arg_types,
                        output: Output::classify(&sig.output),
                    });
                }
            }
        }
    }
    if constructors.is_empty() {
        errors.push(syn::Error::new_spanned(
            &block.self_ty,
            format!(
                "`#[flotilla::actor]` needs a constructor: an associated function returning \
                 `Self` (`pub fn new() -> Self`), to pass to `client.submit_actor({ident}::new, ())`"
            ),
        ));
    }
    Some((ident, constructors, methods))
}

/// The argument types of a constructor or method, checked.
fn arguments<'a>(sig: &'a Signature, errors: &mut Vec<syn::Error>) -> Option<Vec<&'a Type>> {
    let before = errors.len();
    if !sig.generics.params.is_empty() {
        errors.push(syn::Error::new_spanned(
            &sig.generics,
            "actor methods and constructors cannot be generic: calls carry one concrete \
             signature",
        ));
    }
    if let Some(unsafety) = &sig.unsafety {
        errors.push(syn::Error::new(
            unsafety.span,
            "actor methods and constructors cannot be `unsafe fn`",
        ));
    }
    if sig.variadic.is_some() {
        errors.push(syn::Error::new_spanned(
            &sig.variadic,
            "actor methods cannot be variadic",
        ));
    }
    if sig.receiver().is_none() && sig.asyncness.is_some() {
        errors.push(syn::Error::new_spanned(
            sig.asyncness,
            "actor constructors cannot be `async`: write a plain `fn new(..) -> Self`",
        ));
    }
    let mut types = Vec::new();
    for input in &sig.inputs {
        if let FnArg::Typed(param) = input {
            let mut checker = TypeChecker { errors };
            checker.visit_type(&param.ty);
            types.push(&*param.ty);
        }
    }
    let mut checker = TypeChecker { errors };
    if let ReturnType::Type(_, ty) = &sig.output {
        if let Type::ImplTrait(_) = strip_grouping(ty) {
            checker.visit_type(ty);
        }
    }
    (errors.len() == before).then_some(types)
}

/// `-> Self` or `-> Counter`.
fn returns_the_type(output: &ReturnType, ident: &Ident) -> bool {
    match output {
        ReturnType::Type(_, ty) => match strip_grouping(ty) {
            Type::Path(path) if path.qself.is_none() => {
                path.path.is_ident("Self") || path.path.is_ident(ident)
            }
            _ => false,
        },
        ReturnType::Default => false,
    }
}

/// Generates the trait impl, the registrations and the proxies.
fn generate(
    block: &ItemImpl,
    ident: &Ident,
    constructors: &[ConstructorFn<'_>],
    methods: &[Method<'_>],
) -> TokenStream {
    let private = quote!(::flotilla::__private);
    let self_ty = &block.self_ty;
    let type_name = ident.unraw().to_string();
    let proxy = format_ident!("{}Proxy", ident.unraw());
    let blocking_proxy = format_ident!("{}BlockingProxy", ident.unraw());
    let local = |name: &str| Ident::new(name, Span::mixed_site());
    let method_var = local("__flotilla_method");
    let args_var = local("__flotilla_args");
    let decoded = local("__flotilla_decoded");
    let decode_error = local("__flotilla_decode_error");
    let ret = local("__flotilla_ret");
    let value = local("__flotilla_value");
    let error = local("__flotilla_error");
    let handle = local("__flotilla_handle");
    let runtime = local("__flotilla_runtime");
    let arg_idents = |count: usize| -> Vec<Ident> {
        (0..count)
            .map(|index| format_ident!("__flotilla_arg{}", index, span = Span::mixed_site()))
            .collect()
    };

    // One dispatch arm and two proxy methods per method.
    let mut arms = Vec::new();
    let mut proxy_methods = Vec::new();
    let mut blocking_methods = Vec::new();
    for method in methods {
        let func = method.func;
        let name = &func.sig.ident;
        let name_str = name.unraw().to_string();
        let args = arg_idents(method.arg_types.len());
        let pattern = tuple(&args);
        let types = tuple(&method.arg_types);
        let mut call = quote!(#self_ty::#name(self #(, #args)*));
        if func.sig.asyncness.is_some() {
            call = quote!(#call.await);
        }
        let run = match method.output {
            Output::Fallible(_) => quote! {
                let #ret = #call;
                match #ret {
                    ::core::result::Result::Ok(#value) => #private::encode_output(&#value),
                    ::core::result::Result::Err(#error) => {
                        ::core::result::Result::Err(#private::user_error!(#error))
                    }
                }
            },
            Output::Value(_) => quote! {
                let #ret = #call;
                #private::encode_output(&#ret)
            },
            Output::Unit => quote! {
                #call;
                #private::encode_output(&())
            },
        };
        arms.push(quote! {
            #name_str => {
                let #pattern: #types = match #private::decode_args(
                    ::core::concat!(::core::module_path!(), "::", #type_name, "::", #name_str),
                    #args_var,
                ) {
                    ::core::result::Result::Ok(#decoded) => #decoded,
                    ::core::result::Result::Err(#decode_error) => {
                        return ::std::boxed::Box::pin(::core::future::ready(
                            ::core::result::Result::Err(#decode_error),
                        ));
                    }
                };
                ::std::boxed::Box::pin(async move { #run })
            }
        });

        let docs: Vec<_> = func
            .attrs
            .iter()
            .filter(|a| a.path().is_ident("doc") || a.path().is_ident("cfg"))
            .collect();
        let vis = &func.vis;
        let value_type = method.output.value_type();
        let params: Vec<TokenStream> = args
            .iter()
            .zip(&method.arg_types)
            .map(|(arg, ty)| quote!(#arg: #ty))
            .collect();
        let doc = format!(" Calls `{type_name}::{name_str}` on the actor.");
        let doc_separator = (!docs.is_empty()).then(|| quote!(#[doc = ""]));
        proxy_methods.push(quote! {
            #(#docs)*
            #doc_separator
            #[doc = #doc]
            #vis fn #name(&self #(, #params)*) -> ::flotilla::TaskFuture<#value_type> {
                #private::ActorProxy::handle(self).call(#name_str, &#pattern)
            }
        });
        blocking_methods.push(quote! {
            #(#docs)*
            #doc_separator
            #[doc = #doc]
            #vis fn #name(&self #(, #params)*) -> ::flotilla::blocking::TaskFuture<#value_type> {
                self.#runtime.wrap(self.#handle.call(#name_str, &#pattern))
            }
        });
    }

    // One registration per constructor.
    let registrations = constructors.iter().map(|constructor| {
        let name = constructor.ident;
        let args = arg_idents(constructor.arg_types.len());
        let pattern = tuple(&args);
        let types = tuple(&constructor.arg_types);
        quote! {
            #private::inventory::submit! {
                #private::ActorRegistration::new(
                    {
                        fn __flotilla_name() -> &'static str {
                            ::core::any::type_name_of_val(&#self_ty::#name)
                        }
                        __flotilla_name
                    },
                    {
                        // Returns the `TaskError` a worker reports: large,
                        // and not the user's to box.
                        #[allow(clippy::result_large_err)]
                        fn __flotilla_construct(
                            #args_var: &[u8],
                        ) -> ::core::result::Result<
                            ::std::boxed::Box<dyn #private::DynActor>,
                            #private::TaskError,
                        > {
                            let #pattern: #types = #private::decode_args(
                                ::core::concat!(::core::module_path!(), "::", #type_name, "::", ::core::stringify!(#name)),
                                #args_var,
                            )?;
                            ::core::result::Result::Ok(::std::boxed::Box::new(#self_ty::#name(#(#args),*)))
                        }
                        __flotilla_construct
                    },
                )
            }
        }
    });

    let proxy_doc = format!(
        " Handle on a remote `{type_name}` actor, returned by \
         `client.submit_actor({type_name}::new, ..)`: each method call runs on the actor's \
         worker and returns a future. Clones share the actor, which lives while any handle does."
    );
    let blocking_doc =
        format!(" Like [`{proxy}`], for `flotilla::blocking`: methods return blocking futures.");
    quote! {
        #block

        impl #private::Actor for #self_ty {
            const NAME: &'static str = ::core::concat!(::core::module_path!(), "::", #type_name);
            type Proxy = #proxy;

            fn dispatch<'__flotilla>(
                &'__flotilla mut self,
                #method_var: &'__flotilla str,
                #args_var: &'__flotilla [u8],
            ) -> ::core::pin::Pin<::std::boxed::Box<
                dyn ::core::future::Future<Output = #private::TaskOutcome>
                    + ::core::marker::Send
                    + '__flotilla,
            >> {
                let _ = &#args_var;
                match #method_var {
                    #(#arms)*
                    _ => ::std::boxed::Box::pin(::core::future::ready(::core::result::Result::Err(
                        #private::unknown_method(
                            <Self as #private::Actor>::NAME,
                            #method_var,
                        ),
                    ))),
                }
            }
        }

        #(#registrations)*

        #[doc = #proxy_doc]
        #[derive(::core::clone::Clone, ::core::fmt::Debug)]
        #[allow(unreachable_pub)]
        pub struct #proxy {
            #handle: #private::ActorHandle,
        }

        impl #private::ActorProxy for #proxy {
            type Blocking = #blocking_proxy;

            fn from_handle(handle: #private::ActorHandle) -> Self {
                #proxy { #handle: handle }
            }

            fn handle(&self) -> &#private::ActorHandle {
                &self.#handle
            }

            fn into_blocking(self, runtime: #private::BlockingRuntime) -> #blocking_proxy {
                #blocking_proxy { #handle: self.#handle, #runtime: runtime }
            }
        }

        #[allow(unreachable_pub, clippy::unused_unit)]
        impl #proxy {
            #(#proxy_methods)*
        }

        #[doc = #blocking_doc]
        #[derive(::core::clone::Clone, ::core::fmt::Debug)]
        #[allow(unreachable_pub)]
        pub struct #blocking_proxy {
            #handle: #private::ActorHandle,
            #runtime: #private::BlockingRuntime,
        }

        #[allow(unreachable_pub, clippy::unused_unit)]
        impl #blocking_proxy {
            #(#blocking_methods)*
        }
    }
}

/// `()`, `(a,)` or `(a, b, ..)`: a tuple type or pattern of `items`.
fn tuple<T: ToTokens>(items: &[T]) -> TokenStream {
    match items {
        [single] => quote!((#single,)),
        items => quote!((#(#items),*)),
    }
}

/// `ty` is a path whose last segment is the identifier `name`.
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

/// Looks through parentheses and `macro_rules!` groups.
fn strip_grouping(mut ty: &Type) -> &Type {
    loop {
        match ty {
            Type::Group(group) => ty = &group.elem,
            Type::Paren(paren) => ty = &paren.elem,
            _ => return ty,
        }
    }
}

/// Reports argument types a call cannot carry.
struct TypeChecker<'e> {
    errors: &'e mut Vec<syn::Error>,
}

impl<'ast> Visit<'ast> for TypeChecker<'_> {
    fn visit_type_impl_trait(&mut self, node: &'ast syn::TypeImplTrait) {
        self.errors.push(syn::Error::new_spanned(
            node,
            "actor methods cannot use `impl Trait`: a call has one concrete signature; name \
             the type (or write an `async fn`)",
        ));
    }

    fn visit_type_reference(&mut self, node: &'ast syn::TypeReference) {
        self.errors.push(syn::Error::new_spanned(
            node,
            "actor method arguments travel as bytes, so they must be owned types: use \
             `String` instead of `&str`, `Vec<T>` instead of `&[T]`",
        ));
    }

    fn visit_type_bare_fn(&mut self, _node: &'ast syn::TypeBareFn) {}

    fn visit_type(&mut self, node: &'ast Type) {
        visit::visit_type(self, node);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expand_str(item: TokenStream) -> String {
        expand(TokenStream::new(), item).to_string()
    }

    #[test]
    fn counter_expands_to_actor_registration_and_proxies() {
        let out = expand_str(quote! {
            impl Counter {
                pub fn new() -> Self { Counter { count: 0 } }
                pub fn increment(&mut self) -> i64 { self.count += 1; self.count }
                pub async fn get_count(&self) -> i64 { self.count }
                pub fn check(&self, x: i64) -> Result<i64, String> { Ok(x) }
                fn helper() -> i64 { 1 }
            }
        });
        assert!(!out.contains("compile_error"), "{out}");
        assert!(out.contains("impl :: flotilla :: __private :: Actor for Counter"));
        assert!(out.contains("pub struct CounterProxy"));
        assert!(out.contains("pub struct CounterBlockingProxy"));
        assert!(out.contains("\"increment\""));
        assert!(out.contains("\"get_count\""));
        assert!(out.contains("ResultOutput"));
        // Only `new` is a constructor.
        assert_eq!(out.matches("ActorRegistration :: new").count(), 1);
    }

    #[test]
    fn errors_are_reported() {
        for (item, message) in [
            (
                quote!(
                    fn f() {}
                ),
                "inherent `impl` block",
            ),
            (
                quote!(impl Counter { fn new() -> Self { Counter } fn take(self) {} }),
                "cannot consume it",
            ),
            (
                quote!(impl Counter { fn new() -> Self { Counter } fn f(&self, s: &str) {} }),
                "owned types",
            ),
            (
                quote!(impl Counter { fn get(&self) {} }),
                "needs a constructor",
            ),
            (
                quote!(
                    impl<T> Counter<T> {
                        fn new() -> Self {
                            Self::default()
                        }
                    }
                ),
                "cannot be generic",
            ),
            (
                quote!(impl Clone for Counter { fn clone(&self) -> Self { Counter } }),
                "not on a trait impl",
            ),
        ] {
            let out = expand_str(item);
            assert!(out.contains("compile_error"), "{out}");
            assert!(out.contains(message), "{message}: {out}");
        }
        let out = expand(
            quote!(name = "x"),
            quote!(impl C { fn new() -> Self { C } }),
        );
        assert!(out.to_string().contains("takes no arguments"));
    }
}
