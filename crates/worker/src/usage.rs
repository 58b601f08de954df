//! The worker process's resident memory and CPU time, sent with every
//! heartbeat (`WorkerInfo::rss_bytes` and `cpu_ms`).
//!
//! Read from `/proc/self` on Linux, which costs two small file reads every
//! two seconds and no dependency: `VmRSS` of `/proc/self/status` (in kB,
//! so no page size is needed), and `utime` plus `stime` of
//! `/proc/self/stat`, in clock ticks of [`TICKS_PER_SECOND`]. Elsewhere
//! both are `None`, and the scheduler shows nothing for them.

/// Clock ticks per second of `/proc/<pid>/stat`'s times (`USER_HZ`, what
/// `sysconf(_SC_CLK_TCK)` answers): 100 on every architecture Linux
/// builds for but Alpha. A constant rather than the `sysconf` call, which
/// would take `unsafe` code and a `libc` dependency for this crate.
const TICKS_PER_SECOND: u64 = 100;

/// The process's resident memory in bytes and CPU time (user and system)
/// in milliseconds, as far as they can be read.
pub(crate) fn read() -> (Option<u64>, Option<u64>) {
    let rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| rss_bytes(&status));
    let cpu = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| cpu_ms(&stat));
    (rss, cpu)
}

/// `VmRSS` of a `/proc/<pid>/status`, in bytes.
fn rss_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut fields = line["VmRSS:".len()..].split_whitespace();
    let amount: u64 = fields.next()?.parse().ok()?;
    match fields.next()? {
        "kB" => amount.checked_mul(1024),
        _ => None,
    }
}

/// `utime + stime` of a `/proc/<pid>/stat`, in milliseconds.
fn cpu_ms(stat: &str) -> Option<u64> {
    // The command name, field 2, is in parentheses and may hold spaces or
    // parentheses itself: the fields that follow start after the last `)`.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // Fields 3 (`state`) to 13 come first; `utime` and `stime` are 14 and 15.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) * 1000 / TICKS_PER_SECOND)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_comes_from_vm_rss_in_kilobytes() {
        let status =
            "Name:\tflotilla-worker\nVmPeak:\t  900000 kB\nVmRSS:\t   51200 kB\nThreads:\t9\n";
        assert_eq!(rss_bytes(status), Some(51_200 * 1024));
        assert_eq!(rss_bytes("Name:\tkthreadd\n"), None, "no VmRSS");
        assert_eq!(rss_bytes("VmRSS:\t12 MB\n"), None, "an unknown unit");
    }

    #[test]
    fn cpu_time_is_user_plus_system_after_the_command_name() {
        // A command name with a space and a parenthesis in it.
        let stat = "4242 (my worker) 1) S 1 4242 4242 0 -1 4194560 2910 0 0 0 \
                    250 75 0 0 20 0 9 0 12345 900000000 12800 18446744073709551615";
        assert_eq!(cpu_ms(stat), Some(3_250), "(250 + 75) ticks of 10 ms");
        assert_eq!(cpu_ms("4242 (w) S 1 2"), None, "too short");
        assert_eq!(cpu_ms("no parenthesis"), None);
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn this_process_reads_its_own_usage() {
        let (rss, cpu) = read();
        let rss = rss.expect("VmRSS on Linux");
        assert!((1 << 20..1 << 40).contains(&rss), "{rss} bytes");
        // Burn some CPU: the time read moves. On a loaded machine 60 ms of
        // wall clock may bring a few ms of CPU, so burn until it has moved
        // (or 10 s of wall clock have gone by).
        let before = cpu.expect("stat on Linux");
        let start = std::time::Instant::now();
        let mut x = 0u64;
        let mut after = before;
        while after < before + 20 && start.elapsed() < std::time::Duration::from_secs(10) {
            for _ in 0..1_000_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
            after = read().1.unwrap();
        }
        assert!(after >= before + 20, "{before} ms, then {after} ms");
    }
}
