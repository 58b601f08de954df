//! `#[flotilla::task]`: turns a free function into a task handle.
//!
//! For `pub fn add(x: i64, y: i64) -> i64` the expansion is:
//!
//! - `pub struct add;`, the handle passed to `client.submit(add, (1, 2))`,
//!   carrying the function's doc comments;
//! - `impl add { pub fn call(x: i64, y: i64) -> i64 }`, the original
//!   function, for local calls;
//! - `impl ::flotilla::__private::Task for add`, with the argument tuple, the
//!   output type, the registered name and the signature fingerprint;
//! - an `inventory` registration whose invoker decodes the arguments, calls
//!   `add::call` and encodes the output, so that workers find the task by name.
//!
//! The generated code names the runtime only through `::flotilla::__private`.

mod args;
mod duration;
mod signature;

use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote, ToTokens};
use syn::ext::IdentExt;
use syn::{Attribute, Ident, Item, ItemFn, LitInt};

use self::args::TaskArgs;
use self::signature::{Param, TaskOutput, TaskSignature};
use crate::fingerprint;

/// Expands `#[flotilla::task(attr)] item`.
///
/// On error the original function is emitted next to the errors, when it is a
/// valid free function, so that its uses do not pile up unrelated errors.
pub(crate) fn expand(attr: TokenStream, item: TokenStream) -> TokenStream {
    let func = match syn::parse2::<Item>(item) {
        Ok(Item::Fn(func)) => func,
        Ok(other) => {
            let error = syn::Error::new_spanned(
                &other,
                "`#[flotilla::task]` can only be applied to a free function (`fn` or `async fn`)",
            )
            .into_compile_error();
            return quote!(#error #other);
        }
        Err(error) => return error.into_compile_error(),
    };

    match (TaskArgs::parse(attr), signature::analyze(&func.sig)) {
        (Ok(args), Ok(task)) => generate(&func, &args, &task),
        (args, task) => {
            let errors = [args.err(), task.err()]
                .into_iter()
                .flatten()
                .reduce(|mut all, error| {
                    all.combine(error);
                    all
                })
                .map(syn::Error::into_compile_error);
            let original = if signature::is_unusable_as_free_fn(&func.sig) {
                None
            } else {
                Some(&func)
            };
            quote!(#errors #original)
        }
    }
}

/// Generates the handle, its `call`, the `Task` impl and the registration.
fn generate(func: &ItemFn, args: &TaskArgs, task: &TaskSignature<'_>) -> TokenStream {
    let ItemFn {
        attrs,
        vis,
        sig,
        block,
    } = func;
    let handle = &sig.ident;
    let handle_name = handle.unraw().to_string();
    let private = quote!(::flotilla::__private);
    let attrs = SplitAttrs::new(attrs);
    let cfgs = &attrs.cfgs;

    // The handle struct.
    let docs = &attrs.docs;
    let doc_separator = (!docs.is_empty()).then(|| quote!(#[doc = ""]));
    let handle_doc = format!(
        " Flotilla task handle: submit with `client.submit({handle_name}, args)`; \
         call locally with `{handle_name}::call(..)`."
    );

    // The `Task` impl.
    let args_type = tuple(&task.arg_types);
    let output_type = match task.output {
        TaskOutput::Unit => quote!(()),
        TaskOutput::Value(ty) => ty.to_token_stream(),
        TaskOutput::Fallible(ty) => quote!(<#ty as #private::ResultOutput>::Ok),
    };
    let name = match &args.name {
        Some(name) => name.to_token_stream(),
        None => quote!(::core::concat!(::core::module_path!(), "::", #handle_name)),
    };
    let fingerprint = LitInt::new(
        &format!(
            "0x{:016x}_u64",
            fingerprint::fingerprint(&task.arg_types, &sig.output)
        ),
        Span::call_site(),
    );

    // The invoker. Its locals are mixed-site so that they cannot capture, or be
    // captured by, anything named in the user's types.
    let local = |name: &str| Ident::new(name, Span::mixed_site());
    let ctx = local("__flotilla_ctx");
    let payload = local("__flotilla_args");
    let decoded = local("__flotilla_decoded");
    let decode_error = local("__flotilla_decode_error");
    let ret = local("__flotilla_ret");
    let value = local("__flotilla_value");
    let error = local("__flotilla_error");
    let arg_idents: Vec<Ident> = (0..task.arg_types.len())
        .map(|index| format_ident!("__flotilla_arg{}", index, span = Span::mixed_site()))
        .collect();
    let args_pattern = tuple(&arg_idents);
    // The worker's shared state, looked up before the call: a task whose
    // worker lacks a value fails with an error naming its type.
    let mut states = Vec::new();
    let call_args: Vec<TokenStream> = task
        .params
        .iter()
        .map(|param| match param {
            Param::Context => ctx.to_token_stream(),
            Param::Argument(index) => arg_idents[*index].to_token_stream(),
            Param::State(ty) => {
                let state = format_ident!(
                    "__flotilla_state{}",
                    states.len(),
                    span = Span::mixed_site()
                );
                states.push(quote! {
                    let #state = match #private::TaskContext::state::<#ty>(&#ctx) {
                        ::core::result::Result::Ok(#state) => #state,
                        ::core::result::Result::Err(#error) => {
                            return #private::Invocation::Ready(::core::result::Result::Err(
                                ::core::convert::From::from(#error),
                            ));
                        }
                    };
                });
                state.to_token_stream()
            }
        })
        .collect();
    let mut call = quote!(#handle::call(#(#call_args),*));
    if sig.asyncness.is_some() {
        call = quote!(#call.await);
    }
    let run = match task.output {
        TaskOutput::Fallible(_) => quote! {
            let #ret = #call;
            match #ret {
                ::core::result::Result::Ok(#value) => #private::encode_output(&#value),
                ::core::result::Result::Err(#error) => {
                    ::core::result::Result::Err(#private::user_error!(#error))
                }
            }
        },
        TaskOutput::Value(_) => quote! {
            let #ret = #call;
            #private::encode_output(&#ret)
        },
        TaskOutput::Unit => quote! {
            #call;
            #private::encode_output(&())
        },
    };
    let invocation = if sig.asyncness.is_some() {
        quote! {
            #private::Invocation::Async(::std::boxed::Box::pin(async move { #run }))
        }
    } else {
        quote! {
            #private::Invocation::Sync(::std::boxed::Box::new(move || { #run }))
        }
    };

    // The default time limit, if the attribute gives one.
    let timeout = args
        .timeout_ms
        .map(|millis| quote!(.with_timeout_ms(#millis)));

    let call_attrs = &attrs.others;
    let mut call_sig = sig.clone();
    call_sig.ident = Ident::new("call", handle.span());
    quote! {
        #(#cfgs)*
        #[allow(non_camel_case_types)]
        #[derive(
            ::core::clone::Clone,
            ::core::marker::Copy,
            ::core::fmt::Debug,
            ::core::default::Default
        )]
        #(#docs)*
        #doc_separator
        #[doc = #handle_doc]
        #vis struct #handle;

        #(#cfgs)*
        impl #handle {
            /// Runs the task's function locally, in this process.
            #(#call_attrs)*
            #vis #call_sig #block
        }

        #(#cfgs)*
        impl #private::Task for #handle {
            type Args = #args_type;
            type Output = #output_type;
            const NAME: &'static str = #name;
            const FINGERPRINT: u64 = #fingerprint;
        }

        #(#cfgs)*
        #private::inventory::submit! {
            #private::TaskRegistration::new(
                <#handle as #private::Task>::NAME,
                <#handle as #private::Task>::FINGERPRINT,
                {
                    // Its closure returns the `TaskError` a worker reports:
                    // large, and not the user's to box.
                    #[allow(clippy::result_large_err)]
                    fn __flotilla_invoke(
                        #ctx: #private::TaskContext,
                        #payload: #private::Arguments<'_>,
                    ) -> #private::Invocation {
                        let #args_pattern: <#handle as #private::Task>::Args =
                            match #private::decode_arguments(<#handle as #private::Task>::NAME, #payload) {
                                ::core::result::Result::Ok(#decoded) => #decoded,
                                ::core::result::Result::Err(#decode_error) => {
                                    return #private::Invocation::Ready(
                                        ::core::result::Result::Err(#decode_error),
                                    );
                                }
                            };
                        #(#states)*
                        // Silences `unused_variables` for tasks without a context.
                        let _ = &#ctx;
                        #invocation
                    }
                    __flotilla_invoke
                }
            )
            .with_module_path(::core::module_path!())
            #timeout
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

/// The function's attributes, sorted by where they go in the expansion.
struct SplitAttrs<'a> {
    /// `#[doc]` (and `///`): documents the handle.
    docs: Vec<&'a Attribute>,
    /// `#[cfg]`: applies to every generated item.
    cfgs: Vec<&'a Attribute>,
    /// Everything else (`#[allow]`, `#[inline]`, `#[cfg_attr]`, ...): stays on
    /// the function, i.e. on `call`.
    others: Vec<&'a Attribute>,
}

impl<'a> SplitAttrs<'a> {
    /// Sorts `attrs`, keeping their order within each group.
    fn new(attrs: &'a [Attribute]) -> Self {
        let mut split = SplitAttrs {
            docs: Vec::new(),
            cfgs: Vec::new(),
            others: Vec::new(),
        };
        for attr in attrs {
            if attr.path().is_ident("doc") {
                split.docs.push(attr);
            } else if attr.path().is_ident("cfg") {
                split.cfgs.push(attr);
            } else {
                split.others.push(attr);
            }
        }
        split
    }
}

#[cfg(test)]
mod tests;
