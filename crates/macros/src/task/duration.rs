//! Durations as written in `#[flotilla::task(timeout = "...")]`.

/// Parses `"500ms"`, `"30s"`, `"5m"`, `"1h"` or a sum of such parts
/// (`"1m30s"`) into milliseconds. A number needs a unit; the result must be
/// at least one millisecond.
pub(crate) fn parse_millis(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(
            "the duration is empty; write it like \"500ms\", \"30s\", \"5m\" or \"1h\"".into(),
        );
    }
    let mut total: u64 = 0;
    let mut rest = trimmed;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!(
                "`{trimmed}` is not a duration: expected a number at `{rest}` \
                 (write it like \"500ms\", \"30s\", \"5m\" or \"1h\")"
            ));
        }
        let number: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("`{trimmed}`: the number `{}` is too large", &rest[..digits]))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        let scale: u64 = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "" => {
                return Err(format!(
                    "`{trimmed}` has no unit: write `{number}s`, `{number}ms`, `{number}m` or `{number}h`"
                ))
            }
            other => {
                return Err(format!(
                    "`{trimmed}`: unknown unit `{other}` (the units are ms, s, m and h)"
                ))
            }
        };
        total = number
            .checked_mul(scale)
            .and_then(|part| total.checked_add(part))
            .ok_or_else(|| format!("`{trimmed}` is too long"))?;
        rest = &rest[unit_len..];
    }
    if total == 0 {
        return Err(format!(
            "`{trimmed}` is zero: a time limit must be at least 1ms (leave `timeout` out for none)"
        ));
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::parse_millis;

    #[test]
    fn units() {
        assert_eq!(parse_millis("500ms"), Ok(500));
        assert_eq!(parse_millis("30s"), Ok(30_000));
        assert_eq!(parse_millis("5m"), Ok(300_000));
        assert_eq!(parse_millis("2h"), Ok(7_200_000));
        assert_eq!(parse_millis(" 1s "), Ok(1_000));
    }

    #[test]
    fn parts_add_up() {
        assert_eq!(parse_millis("1m30s"), Ok(90_000));
        assert_eq!(parse_millis("1h1m1s1ms"), Ok(3_661_001));
    }

    #[test]
    fn bad_durations_are_explained() {
        assert!(parse_millis("").unwrap_err().contains("empty"));
        assert!(parse_millis("30").unwrap_err().contains("no unit"));
        assert!(parse_millis("30 s")
            .unwrap_err()
            .contains("unknown unit ` s`"));
        assert!(parse_millis("3d").unwrap_err().contains("unknown unit `d`"));
        assert!(parse_millis("s").unwrap_err().contains("expected a number"));
        assert!(parse_millis("1.5s")
            .unwrap_err()
            .contains("unknown unit `.`"));
        assert!(parse_millis("0s").unwrap_err().contains("at least 1ms"));
        assert!(parse_millis("99999999999999999999s")
            .unwrap_err()
            .contains("too large"));
        assert!(parse_millis("9999999999999999h")
            .unwrap_err()
            .contains("too long"));
    }
}
