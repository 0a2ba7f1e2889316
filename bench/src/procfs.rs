//! CPU time and memory of a process, read from Linux's `/proc` (no unsafe code, no libc).

use std::io;
use std::process::Command;
use std::time::Duration;

/// One reading of a process's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessSample {
    /// User plus system CPU time, in clock ticks.
    pub cpu_ticks: u64,
    /// Resident set size now (`VmRSS`).
    pub rss_bytes: u64,
    /// Highest resident set size so far (`VmHWM`).
    pub peak_rss_bytes: u64,
}

/// Reads `/proc/<pid>/stat` and `/proc/<pid>/status`.
pub fn sample(pid: u32) -> io::Result<ProcessSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let malformed = |file: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("/proc/{pid}/{file} is not in the expected format"),
        )
    };
    Ok(ProcessSample {
        cpu_ticks: cpu_ticks(&stat).ok_or_else(|| malformed("stat"))?,
        rss_bytes: status_kib(&status, "VmRSS").ok_or_else(|| malformed("status"))? * 1024,
        peak_rss_bytes: status_kib(&status, "VmHWM").ok_or_else(|| malformed("status"))? * 1024,
    })
}

/// `utime + stime`, fields 14 and 15 of `/proc/<pid>/stat`.
pub fn cpu_ticks(stat: &str) -> Option<u64> {
    // Field 2 is the command name in parentheses and may itself hold spaces or ')'; what
    // follows the last ')' starts at field 3.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(14 - 3);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The value of a `Key:   1234 kB` line of `/proc/<pid>/status`, in KiB (the kernel's "kB").
pub fn status_kib(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let value = line.strip_prefix(key)?.strip_prefix(':')?;
        value.split_whitespace().next()?.parse().ok()
    })
}

/// CPU time the whole machine has spent working (all cores, every process and the kernel),
/// in clock ticks.
pub fn machine_busy_ticks() -> io::Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    busy_ticks(&stat).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "/proc/stat is not in the expected format",
        )
    })
}

/// From the `cpu` line of `/proc/stat`: user, nice, system, irq and softirq time. Idle and
/// iowait are not work; steal is time the hypervisor gave to other machines; guest time is
/// already inside user time.
pub fn busy_ticks(stat: &str) -> Option<u64> {
    let [user, nice, system, _idle, _iowait, irq, softirq] = cpu_fields(stat, "cpu ")?;
    Some(user + nice + system + irq + softirq)
}

/// CPU time one core has spent working (every process and the kernel on it), in clock
/// ticks; the same fields as [`machine_busy_ticks`], from the core's own line.
pub fn core_busy_ticks(core: usize) -> io::Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    core_busy(&stat, core).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("/proc/stat has no line for cpu{core}"),
        )
    })
}

/// From the `cpu<core>` line of `/proc/stat`, as [`busy_ticks`].
pub fn core_busy(stat: &str, core: usize) -> Option<u64> {
    let [user, nice, system, _idle, _iowait, irq, softirq] =
        cpu_fields(stat, &format!("cpu{core} "))?;
    Some(user + nice + system + irq + softirq)
}

/// The first seven counters of the `/proc/stat` line starting with `prefix`.
fn cpu_fields(stat: &str, prefix: &str) -> Option<[u64; 7]> {
    let line = stat.lines().find(|line| line.starts_with(prefix))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(7)
        .map(|field| field.parse().ok())
        .collect::<Option<_>>()?;
    fields.try_into().ok()
}

/// CPU time of the children a process has waited for, `cutime + cstime` (fields 16 and 17
/// of `/proc/<pid>/stat`), in clock ticks.
pub fn waited_children_ticks(pid: u32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    stat_field(&stat, 16)
        .zip(stat_field(&stat, 17))
        .map(|(user, system)| user + system)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("/proc/{pid}/stat is not in the expected format"),
            )
        })
}

/// The processes whose parent is `pid` (from every `/proc/<pid>/stat`).
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&child| {
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| stat_field(&stat, 4))
                == Some(u64::from(pid))
        })
        .collect()
}

/// Field `n` (1-based, as in `proc(5)`) of a `/proc/<pid>/stat` line, from field 3 on.
fn stat_field(stat: &str, n: usize) -> Option<u64> {
    // Field 2 is the command name in parentheses and may itself hold spaces or ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(n.checked_sub(3)?)?.parse().ok()
}

/// Clock ticks per second of the CPU times in `/proc` (`getconf CLK_TCK`).
pub fn clock_ticks_per_second() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .filter(|&hz: &u64| hz > 0)
        // Linux fixes USER_HZ at 100 in its ABI, so this only matters without getconf.
        .unwrap_or(100)
}

/// CPU used over `elapsed`, in cores: 1.0 is one core busy the whole time.
pub fn cores(ticks: u64, ticks_per_second: u64, elapsed: Duration) -> f64 {
    if elapsed.is_zero() || ticks_per_second == 0 {
        return 0.0;
    }
    ticks as f64 / ticks_per_second as f64 / elapsed.as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_add_user_and_system_time_past_an_awkward_command_name() {
        let stat = "4242 (keel (x) y) S 1 4242 4242 0 -1 4194560 1200 0 0 0 731 269 0 0 20 0 3 0 \
                    5000 150331392 2078 18446744073709551615";
        assert_eq!(cpu_ticks(stat), Some(731 + 269));
        assert_eq!(cpu_ticks("garbage"), None);
    }

    #[test]
    fn status_lines_are_read_in_kib() {
        let status = "Name:\tkeel\nVmHWM:\t   51234 kB\nVmRSS:\t   40960 kB\n";
        assert_eq!(status_kib(status, "VmHWM"), Some(51_234));
        assert_eq!(status_kib(status, "VmRSS"), Some(40_960));
        assert_eq!(status_kib(status, "VmSwap"), None);
    }

    #[test]
    fn machine_busy_time_leaves_out_idle_iowait_and_steal() {
        let stat = "cpu  100 2 30 5000 40 5 6 7 0 0\ncpu0 50 1 15 2500 20 2 3 3 0 0\n";
        assert_eq!(busy_ticks(stat), Some(100 + 2 + 30 + 5 + 6));
        assert_eq!(busy_ticks("cpu  1 2 3\n"), None);
    }

    #[test]
    fn a_core_is_read_from_its_own_line() {
        let stat = "cpu  100 2 30 5000 40 5 6 7 0 0\ncpu1 50 1 15 2500 20 2 3 3 0 0\n\
                    cpu10 9 9 9 9 9 9 9 9 0 0\n";
        assert_eq!(core_busy(stat, 1), Some(50 + 1 + 15 + 2 + 3));
        assert_eq!(core_busy(stat, 10), Some(9 * 5));
        assert_eq!(core_busy(stat, 0), None);
    }

    #[test]
    fn stat_fields_are_counted_past_the_command_name() {
        let stat = "4242 (keel (x) y) S 1 4242 4242 0 -1 4194560 1200 0 0 0 731 269 55 45 20 0 3 0";
        assert_eq!(stat_field(stat, 4), Some(1));
        assert_eq!(stat_field(stat, 16), Some(55));
        assert_eq!(stat_field(stat, 17), Some(45));
        assert_eq!(stat_field(stat, 2), None);
    }

    #[test]
    fn the_time_of_waited_for_children_is_readable() {
        assert!(waited_children_ticks(std::process::id()).is_ok());
    }

    #[test]
    fn cores_are_cpu_seconds_per_second() {
        assert_eq!(cores(150, 100, Duration::from_secs(3)), 0.5);
        assert_eq!(cores(150, 100, Duration::ZERO), 0.0);
    }

    #[test]
    fn this_process_can_be_sampled() {
        let sample = sample(std::process::id()).unwrap();
        assert!(sample.rss_bytes > 0);
        assert!(sample.peak_rss_bytes >= sample.rss_bytes);
    }
}
