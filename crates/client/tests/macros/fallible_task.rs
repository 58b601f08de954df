//! Tasks returning a `Result` output its `Ok` type.

use flotilla::__private::Task;

#[flotilla::task]
fn might_fail(x: i64) -> Result<i64, String> {
    if x < 0 {
        Err(format!("{x} is negative"))
    } else {
        Ok(x * 2)
    }
}

#[flotilla::task]
fn read_len(path: String) -> std::io::Result<u64> {
    Ok(std::fs::metadata(path)?.len())
}

#[test]
fn compiles_and_runs() {
    assert_eq!(might_fail::call(2), Ok(4));
    assert!(might_fail::call(-1).is_err());
    let output: <might_fail as Task>::Output = 4_i64;
    let length: <read_len as Task>::Output = 0_u64;
    let _ = (output, length);
}
