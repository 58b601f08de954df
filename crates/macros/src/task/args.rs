//! The arguments of `#[flotilla::task(...)]`.

use proc_macro2::TokenStream;
use quote::ToTokens;
use syn::parse::Parser;
use syn::LitStr;

/// What the attribute accepts, as shown in error messages.
const ACCEPTED: &str = "`name = \"...\"`, `timeout = \"30s\"`";

/// Parsed arguments of `#[flotilla::task(...)]`.
#[derive(Default)]
pub(crate) struct TaskArgs {
    /// `name = "..."`: registers the task under this name instead of
    /// `module_path!()::fn_name`.
    pub(crate) name: Option<LitStr>,
    /// `timeout = "30s"`: the task's default time limit, in milliseconds.
    pub(crate) timeout_ms: Option<u64>,
}

impl TaskArgs {
    /// Parses the tokens between the attribute's parentheses.
    pub(crate) fn parse(tokens: TokenStream) -> syn::Result<Self> {
        let mut args = TaskArgs::default();
        let parser = syn::meta::parser(|meta| {
            if meta.path.is_ident("name") {
                if args.name.is_some() {
                    return Err(meta.error("duplicate `name` argument to `#[flotilla::task]`"));
                }
                let name: LitStr = meta.value()?.parse()?;
                if name.value().trim().is_empty() {
                    return Err(syn::Error::new(
                        name.span(),
                        "the task name cannot be empty: workers look tasks up by this name",
                    ));
                }
                args.name = Some(name);
                Ok(())
            } else if meta.path.is_ident("timeout") {
                if args.timeout_ms.is_some() {
                    return Err(meta.error("duplicate `timeout` argument to `#[flotilla::task]`"));
                }
                let limit: LitStr = meta.value()?.parse()?;
                let millis = super::duration::parse_millis(&limit.value()).map_err(|message| {
                    syn::Error::new(limit.span(), format!("invalid `timeout`: {message}"))
                })?;
                args.timeout_ms = Some(millis);
                Ok(())
            } else {
                let path = meta.path.to_token_stream().to_string().replace(' ', "");
                Err(syn::Error::new_spanned(
                    &meta.path,
                    format!(
                        "unknown argument `{path}` to `#[flotilla::task]`; \
                         the accepted arguments are: {ACCEPTED}"
                    ),
                ))
            }
        });
        parser.parse2(tokens)?;
        Ok(args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quote::quote;

    fn error_of(tokens: TokenStream) -> String {
        match TaskArgs::parse(tokens) {
            Ok(_) => panic!("the arguments should be rejected"),
            Err(error) => error.to_string(),
        }
    }

    fn parse_ok(tokens: TokenStream) -> TaskArgs {
        match TaskArgs::parse(tokens) {
            Ok(args) => args,
            Err(error) => panic!("the arguments should be accepted: {error}"),
        }
    }

    #[test]
    fn no_arguments() {
        let args = parse_ok(TokenStream::new());
        assert!(args.name.is_none());
    }

    #[test]
    fn name_argument() {
        let args = parse_ok(quote!(name = "custom.name"));
        assert_eq!(
            args.name.map(|name| name.value()).as_deref(),
            Some("custom.name")
        );
    }

    #[test]
    fn trailing_comma_is_accepted() {
        let args = parse_ok(quote!(name = "x",));
        assert_eq!(args.name.map(|name| name.value()).as_deref(), Some("x"));
    }

    #[test]
    fn unknown_argument_lists_the_accepted_ones() {
        assert_eq!(
            error_of(quote!(retries = 3)),
            "unknown argument `retries` to `#[flotilla::task]`; \
             the accepted arguments are: `name = \"...\"`, `timeout = \"30s\"`"
        );
        assert!(error_of(quote!(name = "x", priority)).starts_with("unknown argument `priority`"));
    }

    #[test]
    fn name_must_be_a_non_empty_string() {
        assert!(error_of(quote!(name = 5)).contains("expected string literal"));
        assert!(error_of(quote!(name = "")).contains("cannot be empty"));
        assert!(error_of(quote!(name)).contains("expected `=`"));
    }

    #[test]
    fn timeout_argument() {
        assert_eq!(parse_ok(quote!(timeout = "30s")).timeout_ms, Some(30_000));
        assert_eq!(parse_ok(quote!(timeout = "500ms")).timeout_ms, Some(500));
        let both = parse_ok(quote!(name = "x", timeout = "5m"));
        assert_eq!(both.timeout_ms, Some(300_000));
        assert_eq!(both.name.map(|name| name.value()).as_deref(), Some("x"));
        assert!(parse_ok(TokenStream::new()).timeout_ms.is_none());
    }

    #[test]
    fn bad_timeouts_are_rejected() {
        assert!(error_of(quote!(timeout = 30)).contains("expected string literal"));
        assert_eq!(
            error_of(quote!(timeout = "30")),
            "invalid `timeout`: `30` has no unit: write `30s`, `30ms`, `30m` or `30h`"
        );
        assert!(error_of(quote!(timeout = "0s")).contains("at least 1ms"));
        assert_eq!(
            error_of(quote!(timeout = "1s", timeout = "2s")),
            "duplicate `timeout` argument to `#[flotilla::task]`"
        );
    }

    #[test]
    fn duplicate_name_is_rejected() {
        assert_eq!(
            error_of(quote!(name = "a", name = "b")),
            "duplicate `name` argument to `#[flotilla::task]`"
        );
    }
}
