//! Reads the L1 console as it streams: keeps a bounded copy and picks out the rig's
//! markers (`CRX-L1-READY`, `CRX-L1-RESULT`, `CRX-L1-FAIL`, `CRX-L1-EXIT`, `CRX-L1-STALL`),
//! which tests/l1/l1-init.sh and payloads print at the start of a line.

use std::collections::VecDeque;

/// Console bytes kept; past this the oldest lines go (markers are parsed before that).
const MAX_CONSOLE_BYTES: usize = 16 * 1024 * 1024;
/// Results kept; a payload printing more is broken and we stop collecting.
const MAX_RESULTS: usize = 10_000;

/// L1's own timings (guest uptime, seconds): at `/init` and when `/dev/kvm` was ready.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct L1Ready {
    pub init_s: f64,
    pub kvm_s: f64,
}

/// L1's watchdog gave up on the payload (`CRX-L1-STALL {"step":…,"idle_s":…}`).
#[derive(Debug, Clone, PartialEq)]
pub struct Stall {
    /// The last step the payload marked (`CRX-L1-STEP <name>`).
    pub step: String,
    /// L1 seconds since that step.
    pub idle_s: u64,
}

/// What was seen on the console so far.
#[derive(Debug, Default)]
pub struct Console {
    lines: VecDeque<String>,
    bytes: usize,
    /// Lines pushed so far, dropped ones included.
    pushed: usize,
    /// `pushed` when the stall marker arrived: where the watchdog's report starts.
    stall_line: Option<usize>,
    pub stall: Option<Stall>,
    pub results: Vec<serde_json::Value>,
    pub malformed_results: Vec<String>,
    pub ready: Option<L1Ready>,
    /// Why L1 could not offer `/dev/kvm` (`CRX-L1-FAIL <why>`).
    pub failure: Option<String>,
    /// The payload's exit code (`CRX-L1-EXIT <rc>`), first one wins.
    pub exit: Option<i32>,
}

impl Console {
    pub fn push(&mut self, line: &str) {
        self.parse(line);
        self.pushed += 1;
        self.bytes += line.len() + 1;
        self.lines.push_back(line.to_string());
        while self.bytes > MAX_CONSOLE_BYTES {
            match self.lines.pop_front() {
                Some(old) => self.bytes -= old.len() + 1,
                None => break,
            }
        }
    }

    fn parse(&mut self, line: &str) {
        if let Some(json) = line.strip_prefix("CRX-L1-RESULT ") {
            if self.results.len() + self.malformed_results.len() >= MAX_RESULTS {
                return;
            }
            match serde_json::from_str(json.trim()) {
                Ok(value) => self.results.push(value),
                Err(_) => self.malformed_results.push(json.to_string()),
            }
        } else if let Some(json) = line.strip_prefix("CRX-L1-READY ") {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(json.trim()) {
                if let (Some(init_s), Some(kvm_s)) = (v["init_s"].as_f64(), v["kvm_s"].as_f64()) {
                    self.ready = Some(L1Ready { init_s, kvm_s });
                }
            }
        } else if let Some(why) = line.strip_prefix("CRX-L1-FAIL ") {
            self.failure.get_or_insert_with(|| why.trim().to_string());
        } else if let Some(json) = line.strip_prefix("CRX-L1-STALL ") {
            if self.stall.is_none() {
                let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap_or_default();
                self.stall = Some(Stall {
                    step: v["step"].as_str().unwrap_or("?").to_string(),
                    idle_s: v["idle_s"].as_u64().unwrap_or(0),
                });
                self.stall_line = Some(self.pushed);
            }
        } else if let Some(rc) = line.strip_prefix("CRX-L1-EXIT ") {
            if self.exit.is_none() {
                self.exit = rc.split_whitespace().next().and_then(|n| n.parse().ok());
            }
        }
    }

    /// The kept console, one line per line.
    pub fn text(&self) -> String {
        let mut text = String::with_capacity(self.bytes);
        for line in &self.lines {
            text.push_str(line);
            text.push('\n');
        }
        text
    }

    /// For a stall: `before` lines ahead of the watchdog's report and the report itself,
    /// `report` lines at most; `None` without a stall (or once those lines were dropped).
    pub fn stall_report(&self, before: usize, report: usize) -> Option<String> {
        let dropped = self.pushed - self.lines.len();
        let at = self.stall_line?.checked_sub(dropped)?;
        let from = at.saturating_sub(before);
        let lines: Vec<&str> = self
            .lines
            .iter()
            .skip(from)
            .take(at - from + report)
            .map(String::as_str)
            .collect();
        Some(lines.join("\n"))
    }

    /// The last `n` lines.
    pub fn tail(&self, n: usize) -> String {
        let skip = self.lines.len().saturating_sub(n);
        self.lines
            .iter()
            .skip(skip)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn console(lines: &[&str]) -> Console {
        let mut c = Console::default();
        for l in lines {
            c.push(l);
        }
        c
    }

    #[test]
    fn picks_out_ready_results_and_exit() {
        let c = console(&[
            "CRX-L1-READY {\"init_s\":3.34,\"kvm_s\":4.38,\"cpus\":2}",
            "hello",
            "CRX-L1-RESULT {\"check\":\"kvm\",\"ok\":true}",
            "CRX-L1-RESULT {\"check\":\"kvm\",\"ok\"[   25.1] kvm: cut",
            "CRX-L1-EXIT 3",
            "CRX-L1-EXIT 0",
        ]);
        assert_eq!(
            c.ready,
            Some(L1Ready {
                init_s: 3.34,
                kvm_s: 4.38
            })
        );
        assert_eq!(
            c.results,
            vec![serde_json::json!({"check": "kvm", "ok": true})]
        );
        assert_eq!(c.malformed_results.len(), 1);
        assert_eq!(c.exit, Some(3), "the first exit line is the payload's");
        assert_eq!(c.failure, None);
    }

    #[test]
    fn a_marker_must_start_the_line() {
        let c = console(&["echo CRX-L1-EXIT 0", "  CRX-L1-RESULT {}"]);
        assert_eq!(c.exit, None);
        assert!(c.results.is_empty());
    }

    #[test]
    fn failure_is_reported_without_exit() {
        let c = console(&["CRX-L1-FAIL insmod kvm-amd.ko failed: No such device"]);
        assert_eq!(
            c.failure.as_deref(),
            Some("insmod kvm-amd.ko failed: No such device")
        );
        assert_eq!(c.exit, None);
    }

    #[test]
    fn a_stall_report_starts_at_its_marker() {
        let c = console(&[
            "CRX-L1-STEP netns 9.1",
            "CRX-L1-ALIVE 39.0 1.0 0.5 0.2 unshare/140:D:rcu_barrier",
            "CRX-L1-STALL {\"step\":\"netns\",\"step_at\":9.1,\"uptime_s\":250.0,\"idle_s\":241,\"limit_s\":240}",
            "CRX-L1-TASK tid=140 pid=140 ppid=120 state=D comm=unshare",
            "CRX-L1-STALL-END",
        ]);
        assert_eq!(
            c.stall,
            Some(Stall {
                step: "netns".into(),
                idle_s: 241
            })
        );
        let report = c.stall_report(1, 2).expect("a report");
        assert!(report.starts_with("CRX-L1-ALIVE"), "{report}");
        assert!(report.ends_with("state=D comm=unshare"), "{report}");
        assert_eq!(console(&["CRX-L1-EXIT 0"]).stall_report(5, 5), None);
    }

    #[test]
    fn keeps_a_bounded_tail() {
        let mut c = Console::default();
        let line = "x".repeat(1024 * 1024);
        for _ in 0..20 {
            c.push(&line);
        }
        c.push("CRX-L1-EXIT 0");
        assert!(c.text().len() <= MAX_CONSOLE_BYTES);
        assert_eq!(c.tail(1), "CRX-L1-EXIT 0");
        assert_eq!(c.exit, Some(0));
    }
}
