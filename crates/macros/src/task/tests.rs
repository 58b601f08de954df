//! Tests of the whole expansion, on token streams (`tests/pass.rs` and the
//! trybuild tests in `tests/ui.rs` check it against the real runtime).

use super::*;
use syn::{File, ImplItem, ItemImpl, ItemMacro, ItemStruct};

/// Expands and parses the result as a file of items.
fn expand_ok(attr: TokenStream, item: TokenStream) -> File {
    let tokens = expand(attr, item);
    assert!(
        !tokens.to_string().contains("compile_error"),
        "unexpected error: {tokens}"
    );
    syn::parse2(tokens).expect("the expansion should be a list of items")
}

fn handle_struct(file: &File) -> &ItemStruct {
    file.items
        .iter()
        .find_map(|item| match item {
            Item::Struct(item) => Some(item),
            _ => None,
        })
        .expect("a handle struct")
}

fn inherent_impl(file: &File) -> &ItemImpl {
    impls(file).find(|item| item.trait_.is_none()).unwrap()
}

fn task_impl(file: &File) -> &ItemImpl {
    impls(file).find(|item| item.trait_.is_some()).unwrap()
}

fn impls(file: &File) -> impl Iterator<Item = &ItemImpl> {
    file.items.iter().filter_map(|item| match item {
        Item::Impl(item) => Some(item),
        _ => None,
    })
}

fn registration(file: &File) -> String {
    file.items
        .iter()
        .find_map(|item| match item {
            Item::Macro(ItemMacro { mac, .. }) => Some(mac.tokens.to_string()),
            _ => None,
        })
        .expect("an inventory registration")
}

/// The tokens of the associated item `name` of the `Task` impl.
fn task_item(file: &File, name: &str) -> String {
    task_impl(file)
        .items
        .iter()
        .find_map(|item| match item {
            ImplItem::Type(item) if item.ident == name => Some(item.ty.to_token_stream()),
            ImplItem::Const(item) if item.ident == name => Some(item.expr.to_token_stream()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no `{name}` in the Task impl"))
        .to_string()
}

fn normalized(tokens: TokenStream) -> String {
    tokens.to_string()
}

#[test]
fn sync_task_expansion() {
    let file = expand_ok(
        TokenStream::new(),
        quote! {
            /// Adds.
            #[allow(clippy::all)]
            pub fn add(x: i64, y: i64) -> i64 { x + y }
        },
    );

    let handle = handle_struct(&file);
    assert_eq!(handle.ident, "add");
    assert!(matches!(handle.vis, syn::Visibility::Public(_)));
    let docs: Vec<String> = handle
        .attrs
        .iter()
        .filter(|attr| attr.path().is_ident("doc"))
        .map(
            |attr| match &attr.meta.require_name_value().unwrap().value {
                syn::Expr::Lit(syn::ExprLit {
                    lit: syn::Lit::Str(doc),
                    ..
                }) => doc.value(),
                _ => panic!("doc attributes should hold a string"),
            },
        )
        .collect();
    assert_eq!(
        docs,
        [
            " Adds.",
            "",
            " Flotilla task handle: submit with `client.submit(add, args)`; \
             call locally with `add::call(..)`.",
        ]
    );

    let call = match &inherent_impl(&file).items[..] {
        [ImplItem::Fn(call)] => call,
        _ => panic!("`impl add` should hold `call` only"),
    };
    assert_eq!(call.sig.ident, "call");
    assert!(matches!(call.vis, syn::Visibility::Public(_)));
    assert!(call.attrs.iter().any(|attr| attr.path().is_ident("allow")));
    assert_eq!(
        normalized(call.block.to_token_stream()),
        normalized(quote!({ x + y }))
    );

    assert_eq!(task_item(&file, "Args"), normalized(quote!((i64, i64))));
    assert_eq!(task_item(&file, "Output"), "i64");
    assert_eq!(
        task_item(&file, "NAME"),
        normalized(quote!(::core::concat!(::core::module_path!(), "::", "add")))
    );
    assert_eq!(
        task_item(&file, "FINGERPRINT"),
        format!("0x{:016x}_u64", fingerprint::fnv1a64(b"i64,i64->i64"))
    );

    let registration = registration(&file);
    assert!(
        registration.contains("Invocation :: Sync"),
        "{registration}"
    );
    assert!(registration.contains("add :: call (__flotilla_arg0 , __flotilla_arg1)"));
    assert!(registration.contains("encode_output (& __flotilla_ret)"));
    assert!(!registration.contains("await"));
}

#[test]
fn async_fallible_task_with_context_and_name() {
    let file = expand_ok(
        quote!(name = "custom.name"),
        quote! {
            async fn fetch(ctx: TaskContext, url: String) -> Result<Vec<u8>, MyError> {
                Ok(url.into_bytes())
            }
        },
    );

    assert!(matches!(
        handle_struct(&file).vis,
        syn::Visibility::Inherited
    ));
    assert_eq!(task_item(&file, "Args"), normalized(quote!((String,))));
    assert_eq!(
        task_item(&file, "Output"),
        normalized(quote!(
            <Result<Vec<u8>, MyError> as ::flotilla::__private::ResultOutput>::Ok
        ))
    );
    assert_eq!(task_item(&file, "NAME"), "\"custom.name\"");
    assert_eq!(
        task_item(&file, "FINGERPRINT"),
        format!(
            "0x{:016x}_u64",
            fingerprint::fnv1a64(b"String->Result < Vec < u8 > , MyError >")
        )
    );

    let registration = registration(&file);
    assert!(
        registration.contains("Invocation :: Async"),
        "{registration}"
    );
    assert!(registration.contains("fetch :: call (__flotilla_ctx , __flotilla_arg0) . await"));
    assert!(registration.contains("user_error ! (__flotilla_error)"));
}

#[test]
fn unit_task_with_patterns_and_no_arguments() {
    let file = expand_ok(
        TokenStream::new(),
        quote!(
            fn swap(mut x: i64, (a, b): (i32, i32)) {
                x += 1;
            }
        ),
    );
    assert_eq!(task_item(&file, "Output"), "()");
    assert_eq!(
        task_item(&file, "Args"),
        normalized(quote!((i64, (i32, i32))))
    );
    let registration = registration(&file);
    assert!(registration.contains("let (__flotilla_arg0 , __flotilla_arg1) :"));
    assert!(registration.contains("encode_output (& ())"));

    let file = expand_ok(
        TokenStream::new(),
        quote!(
            fn ping() {}
        ),
    );
    assert_eq!(task_item(&file, "Args"), "()");
    assert!(registration_contains(&file, "let () :"));
    assert!(registration_contains(&file, "ping :: call ()"));
}

fn registration_contains(file: &File, needle: &str) -> bool {
    registration(file).contains(needle)
}

#[test]
fn cfg_applies_to_every_item() {
    let file = expand_ok(
        TokenStream::new(),
        quote! {
            #[cfg(feature = "x")]
            #[inline]
            fn f() {}
        },
    );
    let is_cfg = |attr: &Attribute| attr.path().is_ident("cfg");
    assert!(handle_struct(&file).attrs.iter().any(is_cfg));
    assert!(inherent_impl(&file).attrs.iter().any(is_cfg));
    assert!(task_impl(&file).attrs.iter().any(is_cfg));
    let submit = file
        .items
        .iter()
        .find_map(|item| match item {
            Item::Macro(item) => Some(item),
            _ => None,
        })
        .unwrap();
    assert!(submit.attrs.iter().any(is_cfg));
    match &inherent_impl(&file).items[0] {
        ImplItem::Fn(call) => {
            assert!(!call.attrs.iter().any(is_cfg));
            assert!(call.attrs.iter().any(|attr| attr.path().is_ident("inline")));
        }
        _ => panic!("`impl f` should hold `call` only"),
    }
}

#[test]
fn raw_identifiers_are_named_without_prefix() {
    let file = expand_ok(
        TokenStream::new(),
        quote!(
            fn r#match() {}
        ),
    );
    assert_eq!(
        task_item(&file, "NAME"),
        normalized(quote!(::core::concat!(
            ::core::module_path!(),
            "::",
            "match"
        )))
    );
}

#[test]
fn errors_keep_the_original_function() {
    let tokens = expand(
        quote!(retries = 3),
        quote!(
            fn f(x: i64) -> i64 {
                x
            }
        ),
    );
    let text = tokens.to_string();
    assert!(text.contains("compile_error"));
    assert!(text.contains("unknown argument `retries`"));
    assert!(text.contains("fn f (x : i64) -> i64 { x }"), "{text}");
}

#[test]
fn errors_from_arguments_and_signature_are_combined() {
    let tokens = expand(
        quote!(retries = 3),
        quote!(
            fn f<T>(x: T) {}
        ),
    );
    let text = tokens.to_string();
    assert!(text.contains("unknown argument `retries`"));
    assert!(text.contains("cannot be generic"));
}

#[test]
fn methods_are_not_reemitted() {
    let tokens = expand(
        TokenStream::new(),
        quote!(
            fn f(&self) {}
        ),
    );
    let text = tokens.to_string();
    assert!(text.contains("not a method"));
    assert!(!text.contains("fn f"), "{text}");
}

#[test]
fn non_functions_are_rejected() {
    let text = expand(
        TokenStream::new(),
        quote!(
            struct S;
        ),
    )
    .to_string();
    assert!(text.contains("can only be applied to a free function"));
    assert!(text.contains("struct S ;"));
}

#[test]
fn timeout_becomes_the_registrations_default_limit() {
    let file = expand_ok(
        quote!(timeout = "1m30s"),
        quote!(
            async fn slow() {}
        ),
    );
    let registration = registration(&file);
    assert!(
        registration.contains(". with_timeout_ms (90000u64)"),
        "{registration}"
    );

    let file = expand_ok(
        TokenStream::new(),
        quote!(
            fn quick() {}
        ),
    );
    assert!(!registration_contains(&file, "with_timeout_ms"));
}

#[test]
fn state_parameters_are_looked_up_not_decoded() {
    let plain = expand_ok(
        TokenStream::new(),
        quote!(
            fn count(x: i64) -> u64 {
                0
            }
        ),
    );
    let file = expand_ok(
        TokenStream::new(),
        quote!(
            fn count(ctx: TaskContext, hits: flotilla::State<Hits>, x: i64) -> u64 {
                0
            }
        ),
    );
    // The state is no argument: the wire signature is that of `count(x: i64)`.
    assert_eq!(task_item(&file, "Args"), "(i64 ,)");
    assert_eq!(
        task_item(&file, "FINGERPRINT"),
        task_item(&plain, "FINGERPRINT")
    );
    let registration = registration(&file);
    assert!(
        registration.contains("TaskContext :: state :: < Hits > (& __flotilla_ctx)"),
        "{registration}"
    );
    assert!(
        registration
            .contains("count :: call (__flotilla_ctx , __flotilla_state0 , __flotilla_arg0)"),
        "{registration}"
    );
    // A missing value fails the task before it runs.
    assert!(registration.contains("Invocation :: Ready"));
}
