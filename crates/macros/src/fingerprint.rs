//! Signature fingerprints.
//!
//! A task's `FINGERPRINT` is the 64-bit FNV-1a hash of its signature written
//! as `"<argument types joined by ','>-><return type>"`, each type printed with
//! `quote!(#ty).to_string()`. The client and the workers compare fingerprints
//! so that a worker built from an older version of a task, with the same name
//! but different argument or return types, refuses it instead of decoding
//! garbage. The context parameter is not part of the signature.

use quote::ToTokens;
use syn::{ReturnType, Type};

/// FNV-1a 64-bit offset basis.
const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
/// FNV-1a 64-bit prime.
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// The 64-bit FNV-1a hash of `bytes`.
pub(crate) fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(FNV_OFFSET_BASIS, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(FNV_PRIME)
    })
}

/// The text that is hashed: argument types joined by `,`, then `->`, then the
/// return type (`()` when the function declares none).
pub(crate) fn signature_string(arg_types: &[&Type], output: &ReturnType) -> String {
    let args = arg_types
        .iter()
        .map(|ty| ty.to_token_stream().to_string())
        .collect::<Vec<_>>()
        .join(",");
    let ret = match output {
        ReturnType::Default => "()".to_owned(),
        ReturnType::Type(_, ty) => ty.to_token_stream().to_string(),
    };
    format!("{args}->{ret}")
}

/// The fingerprint of a task with these argument types and return type.
pub(crate) fn fingerprint(arg_types: &[&Type], output: &ReturnType) -> u64 {
    fnv1a64(signature_string(arg_types, output).as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use syn::parse_quote;

    #[test]
    fn fnv1a64_matches_reference_vectors() {
        // Vectors from the FNV reference test suite.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn signature_string_joins_arguments_and_return_type() {
        let x: Type = parse_quote!(i64);
        let y: Type = parse_quote!(Vec<String>);
        let output: ReturnType = parse_quote!(-> Result<i64, String>);
        assert_eq!(
            signature_string(&[&x, &y], &output),
            "i64,Vec < String >->Result < i64 , String >"
        );
    }

    #[test]
    fn signature_string_without_return_type_is_unit() {
        let x: Type = parse_quote!(u8);
        assert_eq!(signature_string(&[&x], &ReturnType::Default), "u8->()");
        assert_eq!(signature_string(&[], &ReturnType::Default), "->()");
    }

    #[test]
    fn fingerprint_hashes_the_signature_string() {
        let x: Type = parse_quote!(i64);
        let output: ReturnType = parse_quote!(-> i64);
        assert_eq!(fingerprint(&[&x, &x], &output), fnv1a64(b"i64,i64->i64"));
    }

    #[test]
    fn fingerprint_changes_with_the_types() {
        let int: Type = parse_quote!(i64);
        let uint: Type = parse_quote!(u64);
        let output: ReturnType = parse_quote!(-> i64);
        assert_ne!(
            fingerprint(&[&int], &output),
            fingerprint(&[&uint], &output)
        );
        assert_ne!(
            fingerprint(&[&int], &output),
            fingerprint(&[&int], &ReturnType::Default)
        );
    }
}
