//! CPU time and disk writes of processes, read from `/proc` (Linux only).
//!
//! A benchmark reports what each message cost beside how fast it went: on a shared 2-core
//! machine throughput moves by ±20 % with the disk's mood from one run to the next, while CPU
//! time and bytes written per message hardly move, so they are what an A/B comparison trusts.

use std::time::Duration;

/// What a set of processes had used when read.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    /// User plus system CPU time of all their threads.
    pub cpu: Duration,
    /// Bytes they caused to be sent to storage (`write_bytes` of `/proc/<pid>/io`): page-cache
    /// writeback and direct writes alike, so a WAL append and a table flush both count.
    pub disk_write_bytes: u64,
}

impl Usage {
    /// What was used between `earlier` and `self`.
    pub fn since(&self, earlier: &Usage) -> Usage {
        Usage {
            cpu: self.cpu.saturating_sub(earlier.cpu),
            disk_write_bytes: self
                .disk_write_bytes
                .saturating_sub(earlier.disk_write_bytes),
        }
    }
}

/// The summed usage of `pids`, or `None` if any of them cannot be read (exited, another
/// user's, not Linux): a partial sum would understate the cost.
pub fn of(pids: &[u32]) -> Option<Usage> {
    let mut total = Usage::default();
    let ticks_per_s = ticks_per_second();
    for &pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
        total.cpu += cpu_of_stat(&stat, ticks_per_s)?;
        total.disk_write_bytes += write_bytes_of_io(&io)?;
    }
    Some(total)
}

fn ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions; it returns -1 for an unknown name.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(t).ok().filter(|&t| t > 0).unwrap_or(100)
}

/// utime + stime of a `/proc/<pid>/stat` line. The command name (field 2) is in parentheses
/// and may itself hold spaces or parentheses, so fields are counted from its last `)`.
fn cpu_of_stat(stat: &str, ticks_per_s: u64) -> Option<Duration> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // After the name: state (field 3) … utime is field 14 and stime field 15.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_secs_f64(
        (utime + stime) as f64 / ticks_per_s as f64,
    ))
}

fn write_bytes_of_io(io: &str) -> Option<u64> {
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        // A command name with a space and a parenthesis of its own.
        let stat = "4242 (tokio (rt) x) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 9 0";
        assert_eq!(cpu_of_stat(stat, 100), Some(Duration::from_millis(3250)));
        assert_eq!(cpu_of_stat("4242 (x) S 1 2", 100), None);
        assert_eq!(cpu_of_stat("garbage", 100), None);
    }

    #[test]
    fn write_bytes_is_read_from_its_own_line() {
        let io = "rchar: 10\nwchar: 20\nsyscr: 1\nsyscw: 2\nread_bytes: 4096\nwrite_bytes: 8192\ncancelled_write_bytes: 0\n";
        assert_eq!(write_bytes_of_io(io), Some(8192));
        assert_eq!(write_bytes_of_io("rchar: 10\n"), None);
    }

    #[test]
    fn this_process_can_be_read_and_its_cpu_grows() {
        let me = [std::process::id()];
        let Some(before) = of(&me) else {
            // Not Linux, or /proc is not mounted: nothing to read.
            assert!(std::fs::metadata("/proc/self/stat").is_err());
            return;
        };
        let start = std::time::Instant::now();
        let mut x = 0u64;
        // Spin until the kernel has charged at least a few ticks to this process.
        while of(&me).unwrap().cpu.saturating_sub(before.cpu) < Duration::from_millis(30) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "cpu time never grew"
            );
        }
        std::hint::black_box(x);
        let after = of(&me).unwrap();
        assert!(after.since(&before).cpu >= Duration::from_millis(30));
        assert_eq!(
            before.since(&after).cpu,
            Duration::ZERO,
            "saturates, never wraps"
        );
        assert_eq!(
            of(&[u32::MAX]),
            None,
            "a missing process is not counted as zero"
        );
    }
}
