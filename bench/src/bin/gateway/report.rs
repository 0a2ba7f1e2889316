//! What a run measured: a Markdown table with ratios to NGINX (doing Keel's per-request
//! work), the targets checked against it and, for reference, against NGINX bare, and the
//! notes that say whether the figures can be trusted; or the same as JSON.

use std::fmt;

use serde::Serialize;

use crate::process::Placement;
use crate::targets::{Target, Versions};
use crate::wrk::WrkResult;

/// Targets (issue: gateway benchmark), as ratios to NGINX in the same run: to
/// [`Target::Nginx`], which does Keel's per-request work; checked against
/// [`Target::NginxBare`] too, for reference.
const TARGET_PLAIN_RPS: f64 = 1.0;
const TARGET_PLAIN_P99: f64 = 1.0;
const TARGET_FULL_RPS: f64 = 0.9;
/// A core busier than this is saturated.
const SATURATED: f64 = 0.95;
/// CPU of a core going to other work above which a run's figures are flagged as disturbed.
const DISTURBED: f64 = 0.10;

#[derive(Debug, Serialize)]
pub struct Report {
    /// When the run started, UTC.
    pub date: String,
    pub command: String,
    pub machine: Machine,
    pub versions: Versions,
    /// `abc1234`, with `+ uncommitted changes` when the tree has them.
    pub keel_commit: Option<String>,
    pub load: LoadInfo,
    /// With `--rounds N`: the median round of each target (by its req/s).
    pub rows: Vec<Row>,
    /// Each round's figures, every target measured once per round in turn; empty for one
    /// round. Ratios are then the median of the rounds' own ratios to NGINX, which drift
    /// on a noisy machine cancels out of.
    pub rounds: Vec<Vec<RoundFigure>>,
    pub targets: Vec<TargetCheck>,
}

/// One target's figures in one round.
#[derive(Debug, Clone, Serialize)]
pub struct RoundFigure {
    pub target: Target,
    pub requests_per_second: f64,
    pub p99_ms: f64,
    pub errors: bool,
}

#[derive(Debug, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu_model: String,
    pub kernel: String,
}

#[derive(Debug, Serialize)]
pub struct LoadInfo {
    pub connections: usize,
    pub duration_s: u64,
    pub warmup_s: u64,
    pub proxy_cpu: usize,
    pub load_cpu: usize,
}

#[derive(Debug, Serialize)]
pub struct Row {
    pub target: Target,
    pub label: &'static str,
    pub outcome: Outcome,
}

#[derive(Debug, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    Measured(Measurement),
    Failed { error: String },
}

#[derive(Debug, Serialize)]
pub struct Measurement {
    pub wrk: WrkResult,
    /// The proxy's core during the measured run; "ours" is the proxy.
    pub proxy_core: CoreUse,
    /// The load's core; "ours" is wrk and the upstream.
    pub load_core: CoreUse,
    /// Where the proxy ran; `None` for the upstream measured directly.
    pub placement: Option<Placement>,
    /// What the target's token issuer answered (everything on).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issuer: Option<IssuerRequests>,
    /// What the target wrote to its access log (everything on).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_log: Option<AccessLogSize>,
}

/// Requests the token issuer (a `keel_jwt` TestIssuer in the harness process, not pinned)
/// answered while its target ran: the gateway fetches keys once and caches them, so these
/// are a handful, none of them per request.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct IssuerRequests {
    /// Metadata documents (`/.well-known/…`), from the target's start to the end of its
    /// measured run.
    pub metadata: usize,
    /// Key sets (`/jwks.json`), likewise.
    pub key_sets: usize,
    /// Of both, those during the measured run.
    pub during_measured_run: usize,
}

/// The access log after the measured run.
#[derive(Debug, Clone, Serialize)]
pub struct AccessLogSize {
    pub path: String,
    pub bytes: u64,
    pub lines: u64,
    /// Requests wrk completed in the warm-up and the measured run; the log also has the
    /// readiness probes, so it should have at least this many lines.
    pub requests: u64,
}

/// How one core was used during a measured run, in cores (1.0 = busy all the time).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct CoreUse {
    /// Everything but idle, iowait and steal: every process and the kernel.
    pub busy: f64,
    /// Of which the processes the run pinned to this core (their kernel time, loopback
    /// networking among it, included).
    pub ours: f64,
}

impl CoreUse {
    /// What the rest took: other processes, or kernel work outside ours (`ksoftirqd`).
    pub fn other(&self) -> f64 {
        (self.busy - self.ours).max(0.0)
    }
}

impl fmt::Display for CoreUse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:>3.0} % busy: ours {:>3.0} %, other {:>3.0} %",
            self.busy * 100.0,
            self.ours * 100.0,
            self.other() * 100.0
        )
    }
}

#[derive(Debug, Serialize)]
pub struct TargetCheck {
    pub name: &'static str,
    /// What the ratio is to: NGINX, or NGINX bare.
    pub reference: Target,
    /// `>= 1.00x` and the like.
    pub wanted: String,
    /// The ratio measured, when both sides were.
    pub ratio: Option<f64>,
    pub verdict: String,
}

impl Report {
    fn measured(&self, target: Target) -> Option<&Measurement> {
        self.rows.iter().find_map(|row| match &row.outcome {
            Outcome::Measured(m) if row.target == target => Some(m),
            _ => None,
        })
    }

    fn why_not(&self, target: Target) -> String {
        self.rows
            .iter()
            .find(|row| row.target == target)
            .map_or_else(
                || "not run (left out with --targets)".to_owned(),
                |row| match &row.outcome {
                    Outcome::Measured(_) => "measured".to_owned(),
                    Outcome::Failed { .. } => "failed (see the notes)".to_owned(),
                },
            )
    }

    /// `figure` of `target` over `reference`'s, and whether either run had errors.
    fn ratio_to(
        &self,
        target: Target,
        reference: Target,
        figure: fn(&WrkResult) -> f64,
    ) -> Result<(f64, bool), String> {
        let by = self
            .measured(reference)
            .ok_or_else(|| format!("{}: {}", reference.label(), self.why_not(reference)))?;
        let of = self.measured(target).ok_or_else(|| self.why_not(target))?;
        if !self.rounds.is_empty() {
            return self.median_round_ratio(target, reference, figure);
        }
        let errors = by.wrk.errors().is_some() || of.wrk.errors().is_some();
        Ok((figure(&of.wrk) / figure(&by.wrk), errors))
    }

    /// The median over rounds of `target`'s figure divided by `reference`'s in the same
    /// round.
    fn median_round_ratio(
        &self,
        target: Target,
        reference: Target,
        figure: fn(&WrkResult) -> f64,
    ) -> Result<(f64, bool), String> {
        let mut errors = false;
        let mut ratios: Vec<f64> = self
            .rounds
            .iter()
            .filter_map(|round| {
                let find = |t: Target| round.iter().find(|r| r.target == t);
                let (of, by) = (find(target)?, find(reference)?);
                errors |= of.errors || by.errors;
                let as_wrk = |r: &RoundFigure| WrkResult {
                    requests_per_second: r.requests_per_second,
                    p99_ms: r.p99_ms,
                    ..WrkResult::default()
                };
                Some(figure(&as_wrk(of)) / figure(&as_wrk(by)))
            })
            .collect();
        if ratios.is_empty() {
            return Err("no round measured both".to_owned());
        }
        ratios.sort_by(f64::total_cmp);
        Ok((median(&ratios), errors))
    }

    /// Checks the targets of the issue against the measured rows: against NGINX doing
    /// Keel's work, then the same against NGINX bare (which does less), so that neither
    /// comparison is hidden.
    pub fn check_targets(&mut self) {
        let rps = |w: &WrkResult| w.requests_per_second;
        let p99 = |w: &WrkResult| w.p99_ms;
        let checks = [
            (
                Target::Nginx,
                [
                    "Keel plain, req/s vs NGINX",
                    "Keel plain, p99 vs NGINX",
                    "Keel everything on, req/s vs NGINX",
                ],
            ),
            (
                Target::NginxBare,
                [
                    "Keel plain, req/s vs NGINX bare",
                    "Keel plain, p99 vs NGINX bare",
                    "Keel everything on, req/s vs NGINX bare",
                ],
            ),
        ];
        self.targets = checks
            .into_iter()
            .flat_map(|(reference, [plain_rps, plain_p99, full_rps])| {
                [
                    check(
                        plain_rps,
                        reference,
                        Wanted::AtLeast(TARGET_PLAIN_RPS),
                        self.ratio_to(Target::Keel, reference, rps),
                    ),
                    check(
                        plain_p99,
                        reference,
                        Wanted::AtMost(TARGET_PLAIN_P99),
                        self.ratio_to(Target::Keel, reference, p99),
                    ),
                    check(
                        full_rps,
                        reference,
                        Wanted::AtLeast(TARGET_FULL_RPS),
                        self.ratio_to(Target::KeelFull, reference, rps),
                    ),
                ]
            })
            .collect();
    }

    /// What makes a figure suspect, and why a target was not measured.
    fn notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        for row in &self.rows {
            match &row.outcome {
                Outcome::Measured(m) => {
                    if let Some(errors) = m.wrk.errors() {
                        notes.push(format!("{}: {errors}", row.label));
                    }
                    let cores = [
                        (self.load.proxy_cpu, &m.proxy_core),
                        (self.load.load_cpu, &m.load_core),
                    ];
                    for (cpu, core) in cores {
                        // Nothing of the direct run is on the proxy's core.
                        let counts = row.target != Target::Direct || cpu == self.load.load_cpu;
                        if counts && core.other() > DISTURBED {
                            notes.push(format!(
                                "{}: other work took {:.0} % of CPU {cpu} during the run (other \
                                 processes, or kernel work outside ours); its figures may be \
                                 disturbed",
                                row.label,
                                core.other() * 100.0
                            ));
                        }
                    }
                    if let Some(issuer) = &m.issuer {
                        notes.push(format!(
                            "{}: its token issuer (in the harness process, not pinned) answered \
                             {} metadata and {} key-set requests from the gateway's start to \
                             the end of the measured run, {} of them during the measured run \
                             (keys are fetched once and cached, not per request)",
                            row.label, issuer.metadata, issuer.key_sets, issuer.during_measured_run
                        ));
                    }
                    if let Some(log) = &m.access_log {
                        let mut note = format!(
                            "{}: access log {}: {} lines, {:.1} MB, for {} requests in the \
                             warm-up and the measured run (the peers write no access log)",
                            row.label,
                            log.path,
                            thousands(log.lines as f64),
                            log.bytes as f64 / 1e6,
                            thousands(log.requests as f64),
                        );
                        if log.lines < log.requests {
                            note.push_str(&format!(
                                "; {} lines are missing: dropped by a writer that fell behind \
                                 (keel_gateway_access_log_dropped_total) or not yet written",
                                thousands((log.requests - log.lines) as f64)
                            ));
                        }
                        notes.push(note);
                    }
                    if row.target != Target::Direct
                        && m.load_core.busy >= SATURATED
                        && m.proxy_core.busy < SATURATED
                    {
                        notes.push(format!(
                            "{}: CPU {} (wrk and the upstream) was saturated ({:.0} %) while the \
                             proxy's CPU {} was not ({:.0} %): the figure is the load side's \
                             limit, not the proxy's",
                            row.label,
                            self.load.load_cpu,
                            m.load_core.busy * 100.0,
                            self.load.proxy_cpu,
                            m.proxy_core.busy * 100.0
                        ));
                    }
                }
                Outcome::Failed { error } => {
                    notes.push(format!("{}: failed: {error}", row.label));
                }
            }
        }
        notes
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let load = &self.load;
        let v = &self.versions;
        writeln!(f, "Keel gateway benchmark")?;
        writeln!(f, "  date      {}", self.date)?;
        writeln!(f, "  command   {}", self.command)?;
        writeln!(
            f,
            "  machine   {} cores ({}), Linux {}",
            self.machine.cores, self.machine.cpu_model, self.machine.kernel
        )?;
        writeln!(
            f,
            "  keel      {}{}",
            v.keel,
            self.keel_commit
                .as_ref()
                .map(|c| format!(", commit {c}"))
                .unwrap_or_default()
        )?;
        writeln!(
            f,
            "  peers     {}, HAProxy {}, {}",
            v.nginx, v.haproxy, v.wrk
        )?;
        writeln!(
            f,
            "  load      wrk -t1 -c{} -d{}s --latency, GET / answered with a 13-byte body, after a \
             {}s warm-up; one target at a time",
            load.connections, load.duration_s, load.warmup_s
        )?;
        writeln!(
            f,
            "  pinning   each proxy on CPU {} (NGINX 1 worker, HAProxy nbthread 1, keel \
             TOKIO_WORKER_THREADS=1); wrk and the upstream on CPU {}",
            load.proxy_cpu, load.load_cpu
        )?;
        writeln!(
            f,
            "  work      each proxy but NGINX bare adds x-forwarded-for, -host, -proto and a \
             generated x-request-id to the upstream request and x-request-id to the response, \
             as keel does; ratios are to that NGINX"
        )?;
        writeln!(f)?;

        let nginx = self.measured(Target::Nginx);
        writeln!(
            f,
            "| target | req/s | p50 | p99 | req/s vs NGINX | p99 vs NGINX |"
        )?;
        writeln!(f, "|---|---:|---:|---:|---:|---:|")?;
        for row in &self.rows {
            match &row.outcome {
                Outcome::Measured(m) => {
                    let w = &m.wrk;
                    let (rps_ratio, p99_ratio) = match nginx {
                        Some(n) => (
                            ratio(w.requests_per_second / n.wrk.requests_per_second),
                            ratio(w.p99_ms / n.wrk.p99_ms),
                        ),
                        None => ("-".to_owned(), "-".to_owned()),
                    };
                    let flag = if w.errors().is_some() {
                        " (errors)"
                    } else {
                        ""
                    };
                    writeln!(
                        f,
                        "| {}{flag} | {} | {} | {} | {rps_ratio} | {p99_ratio} |",
                        row.label,
                        thousands(w.requests_per_second),
                        millis(w.p50_ms),
                        millis(w.p99_ms),
                    )?;
                }
                Outcome::Failed { .. } => {
                    writeln!(f, "| {} | failed | - | - | - | - |", row.label)?;
                }
            }
        }
        writeln!(f)?;

        writeln!(
            f,
            "CPU during each measured run (ours: the proxy on CPU {}; wrk and the upstream on CPU {})",
            load.proxy_cpu, load.load_cpu
        )?;
        for row in &self.rows {
            if let Outcome::Measured(m) = &row.outcome {
                writeln!(f, "  {}", row.label)?;
                writeln!(f, "    CPU {}  {}", load.proxy_cpu, m.proxy_core)?;
                writeln!(f, "    CPU {}  {}", load.load_cpu, m.load_core)?;
                if let Some(p) = &m.placement {
                    writeln!(
                        f,
                        "    proxy  pid {}, allowed CPUs {}, {} threads",
                        p.pid,
                        p.cpus,
                        p.threads.map_or("?".to_owned(), |n| n.to_string())
                    )?;
                }
            }
        }
        writeln!(f)?;

        if !self.rounds.is_empty() {
            writeln!(
                f,
                "rounds (req/s, and the ratio to NGINX in the same round; the table shows each \
                 target's median round)"
            )?;
            for (n, round) in self.rounds.iter().enumerate() {
                let nginx = round.iter().find(|r| r.target == Target::Nginx);
                let figures: Vec<String> = round
                    .iter()
                    .map(|r| {
                        let vs = nginx.map_or(String::new(), |n| {
                            format!(
                                " ({})",
                                ratio(r.requests_per_second / n.requests_per_second)
                            )
                        });
                        format!(
                            "{} {}{vs}",
                            r.target.label(),
                            thousands(r.requests_per_second)
                        )
                    })
                    .collect();
                writeln!(f, "  {}: {}", n + 1, figures.join(", "))?;
            }
            writeln!(f)?;
            writeln!(
                f,
                "targets (median of the rounds' ratios to NGINX), then the same against NGINX bare"
            )?;
        } else {
            writeln!(
                f,
                "targets (ratios to NGINX in this run), then the same against NGINX bare"
            )?;
        }
        for check in &self.targets {
            writeln!(
                f,
                "  {:<40} {:<9} {:>7}   {}",
                check.name,
                check.wanted,
                check.ratio.map_or("-".to_owned(), ratio),
                check.verdict
            )?;
        }

        let notes = self.notes();
        writeln!(f)?;
        if notes.is_empty() {
            writeln!(
                f,
                "notes: none (no errors, no target failed, no load-side limit)"
            )?;
        } else {
            writeln!(f, "notes")?;
            for note in notes {
                writeln!(f, "  - {note}")?;
            }
        }
        Ok(())
    }
}

/// The middle of sorted `values` (the mean of the two middle ones for an even count).
fn median(values: &[f64]) -> f64 {
    let mid = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    }
}

/// A target as a bound on a ratio to NGINX (or NGINX bare).
#[derive(Debug, Clone, Copy)]
enum Wanted {
    AtLeast(f64),
    AtMost(f64),
}

fn check(
    name: &'static str,
    reference: Target,
    wanted: Wanted,
    ratio: Result<(f64, bool), String>,
) -> TargetCheck {
    let (bound, met, text) = match wanted {
        Wanted::AtLeast(bound) => (bound, ratio.as_ref().is_ok_and(|r| r.0 >= bound), ">="),
        Wanted::AtMost(bound) => (bound, ratio.as_ref().is_ok_and(|r| r.0 <= bound), "<="),
    };
    let (ratio, verdict) = match ratio {
        Err(reason) => (None, format!("not measured: {reason}")),
        Ok((ratio, errors)) => {
            let mut verdict = if met {
                "met".to_owned()
            } else {
                format!("missed by {:.0} %", (ratio - bound).abs() / bound * 100.0)
            };
            if errors {
                verdict.push_str(" (but a run had errors; see the notes)");
            }
            (Some(ratio), verdict)
        }
    };
    TargetCheck {
        name,
        reference,
        wanted: format!("{text} {bound:.2}x"),
        ratio,
        verdict,
    }
}

fn ratio(value: f64) -> String {
    format!("{value:.2}x")
}

fn millis(ms: f64) -> String {
    format!("{ms:.2} ms")
}

/// `81093.37` as `81,093`.
fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wrk::SocketErrors;

    fn wrk(rps: f64, p99_ms: f64) -> WrkResult {
        WrkResult {
            requests_per_second: rps,
            p50_ms: p99_ms / 2.0,
            p99_ms,
            requests: (rps * 10.0) as u64,
            non_2xx: 0,
            socket_errors: SocketErrors::default(),
        }
    }

    fn measured(target: Target, rps: f64, p99_ms: f64) -> Row {
        Row {
            target,
            label: target.label(),
            outcome: Outcome::Measured(Measurement {
                wrk: wrk(rps, p99_ms),
                proxy_core: CoreUse {
                    busy: 1.0,
                    ours: 0.95,
                },
                load_core: CoreUse {
                    busy: 0.6,
                    ours: 0.55,
                },
                placement: None,
                issuer: None,
                access_log: None,
            }),
        }
    }

    fn report(rows: Vec<Row>) -> Report {
        let mut report = Report {
            date: "2026-11-27T10:00:00Z".to_owned(),
            command: "scripts/bench gateway".to_owned(),
            machine: Machine {
                cores: 2,
                cpu_model: "Test CPU".to_owned(),
                kernel: "6.0".to_owned(),
            },
            versions: Versions {
                nginx: "nginx/1.22.1".to_owned(),
                haproxy: "2.6.12".to_owned(),
                wrk: "wrk 4.1.0".to_owned(),
                keel: "keel 0.1.0".to_owned(),
            },
            keel_commit: None,
            load: LoadInfo {
                connections: 64,
                duration_s: 15,
                warmup_s: 3,
                proxy_cpu: 0,
                load_cpu: 1,
            },
            rows,
            rounds: Vec::new(),
            targets: Vec::new(),
        };
        report.check_targets();
        report
    }

    /// One target's figures in one round: `rps`, and a p99 of 2 ms.
    fn figure(target: Target, rps: f64) -> RoundFigure {
        RoundFigure {
            target,
            requests_per_second: rps,
            p99_ms: 2.0,
            errors: false,
        }
    }

    #[test]
    fn with_rounds_the_ratio_is_the_median_of_each_rounds_own() {
        let mut report = report(vec![
            measured(Target::Nginx, 80_000.0, 2.0),
            measured(Target::Keel, 80_000.0, 2.0),
        ]);
        // NGINX drifts from round to round; keel's ratio in each is 0.9, 1.2 and 1.0.
        report.rounds = vec![
            vec![figure(Target::Nginx, 100.0), figure(Target::Keel, 90.0)],
            vec![figure(Target::Nginx, 50.0), figure(Target::Keel, 60.0)],
            vec![figure(Target::Nginx, 80.0), figure(Target::Keel, 80.0)],
        ];
        report.check_targets();
        assert_eq!(report.targets[0].ratio, Some(1.0));
        let text = report.to_string();
        assert!(
            text.contains(&format!(
                "  2: {} 50 (1.00x), Keel gateway, plain 60 (1.20x)",
                Target::Nginx.label()
            )),
            "{text}"
        );
        assert!(text.contains("targets (median of the rounds' ratios to NGINX)"));
    }

    #[test]
    fn ratios_are_to_nginx_and_targets_are_checked() {
        let report = report(vec![
            measured(Target::Nginx, 40_000.0, 2.0),
            measured(Target::Keel, 44_000.0, 2.5),
            Row {
                target: Target::KeelFull,
                label: Target::KeelFull.label(),
                outcome: Outcome::Failed {
                    error: "exited during the run".to_owned(),
                },
            },
        ]);
        let [plain_rps, plain_p99, full_rps] = &report.targets[..3] else {
            panic!("three targets against NGINX");
        };
        assert!(
            report.targets[..3]
                .iter()
                .all(|t| t.reference == Target::Nginx)
        );
        assert_eq!(plain_rps.ratio, Some(1.1));
        assert_eq!(plain_rps.verdict, "met");
        assert_eq!(plain_p99.ratio, Some(1.25));
        assert_eq!(plain_p99.verdict, "missed by 25 %");
        assert_eq!(full_rps.ratio, None);
        assert_eq!(full_rps.verdict, "not measured: failed (see the notes)");

        let text = report.to_string();
        assert!(text.contains(&format!(
            "| {} | 40,000 | 1.00 ms | 2.00 ms | 1.00x | 1.00x |",
            Target::Nginx.label()
        )));
        assert!(
            text.contains("| Keel gateway, plain | 44,000 | 1.25 ms | 2.50 ms | 1.10x | 1.25x |")
        );
        assert!(text.contains("| failed | - |"));
        assert!(text.contains("failed: exited during the run"));
    }

    #[test]
    fn the_targets_are_checked_against_nginx_bare_too() {
        let mut report = report(vec![
            measured(Target::Nginx, 40_000.0, 2.0),
            measured(Target::NginxBare, 50_000.0, 2.0),
            measured(Target::Keel, 44_000.0, 2.5),
            measured(Target::KeelFull, 40_000.0, 3.0),
        ]);
        let [plain_rps, plain_p99, full_rps] = &report.targets[3..] else {
            panic!("three targets against NGINX bare");
        };
        assert!(
            report.targets[3..]
                .iter()
                .all(|t| t.reference == Target::NginxBare)
        );
        assert_eq!(plain_rps.name, "Keel plain, req/s vs NGINX bare");
        assert_eq!(plain_rps.ratio, Some(0.88));
        assert_eq!(plain_rps.verdict, "missed by 12 %");
        assert_eq!(plain_p99.ratio, Some(1.25));
        assert_eq!(full_rps.ratio, Some(0.8));
        assert_eq!(full_rps.verdict, "missed by 11 %");
        // The same rows against the NGINX doing Keel's work: all three met but p99.
        assert_eq!(report.targets[0].ratio, Some(1.1));
        assert_eq!(report.targets[2].ratio, Some(1.0));
        assert_eq!(report.targets[2].verdict, "met");

        // The table's ratios stay relative to that NGINX; the bare row shows what the
        // headers cost it.
        let text = report.to_string();
        assert!(
            text.contains(&format!(
                "| {} | 50,000 | 1.00 ms | 2.00 ms | 1.25x | 1.00x |",
                Target::NginxBare.label()
            )),
            "{text}"
        );
        let line = text
            .lines()
            .find(|line| {
                line.trim_start()
                    .starts_with("Keel everything on, req/s vs NGINX bare")
            })
            .unwrap_or_else(|| panic!("{text}"));
        assert!(
            line.contains(">= 0.90x") && line.contains("0.80x") && line.contains("missed by 11 %"),
            "{line}"
        );

        // With rounds, each round's own ratio to NGINX bare (0.8, 0.9, 1.0).
        report.rounds = vec![
            vec![figure(Target::NginxBare, 100.0), figure(Target::Keel, 80.0)],
            vec![figure(Target::NginxBare, 50.0), figure(Target::Keel, 45.0)],
            vec![figure(Target::NginxBare, 80.0), figure(Target::Keel, 80.0)],
        ];
        report.check_targets();
        assert_eq!(report.targets[3].ratio, Some(0.9));
        // No round measured NGINX.
        assert_eq!(
            report.targets[0].verdict,
            "not measured: no round measured both"
        );
    }

    #[test]
    fn without_nginx_nothing_is_compared() {
        let report = report(vec![measured(Target::Keel, 44_000.0, 2.5)]);
        assert!(report.targets.iter().all(|t| t.ratio.is_none()));
        assert!(
            report
                .to_string()
                .contains("| 44,000 | 1.25 ms | 2.50 ms | - | - |")
        );
    }

    #[test]
    fn errors_and_a_saturated_load_side_are_noted() {
        let mut rows = vec![measured(Target::Nginx, 40_000.0, 2.0)];
        if let Outcome::Measured(m) = &mut rows[0].outcome {
            m.wrk.non_2xx = 12;
            m.proxy_core.busy = 0.7;
            m.proxy_core.ours = 0.65;
            m.load_core.busy = 1.0;
            m.load_core.ours = 0.6;
        }
        let text = report(rows).to_string();
        let nginx = Target::Nginx.label();
        assert!(text.contains(&format!("| {nginx} (errors) |")), "{text}");
        assert!(text.contains(&format!("{nginx}: 12 non-2xx/3xx responses")));
        assert!(text.contains("the figure is the load side's limit"));
        assert!(text.contains(&format!(
            "{nginx}: other work took 40 % of CPU 1 during the run"
        )));
        assert!(!text.contains("of CPU 0 during the run"));
    }

    #[test]
    fn the_issuer_and_the_access_log_are_noted() {
        let mut rows = vec![measured(Target::KeelFull, 30_000.0, 3.0)];
        if let Outcome::Measured(m) = &mut rows[0].outcome {
            m.issuer = Some(IssuerRequests {
                metadata: 1,
                key_sets: 1,
                during_measured_run: 0,
            });
            m.access_log = Some(AccessLogSize {
                path: "/tmp/run/keel-full-access.log".to_owned(),
                bytes: 2_500_000,
                lines: 9_990,
                requests: 10_000,
            });
        }
        let text = report(rows).to_string();
        assert!(
            text.contains("answered 1 metadata and 1 key-set requests"),
            "{text}"
        );
        assert!(text.contains("0 of them during the measured run"), "{text}");
        assert!(
            text.contains(
                "access log /tmp/run/keel-full-access.log: 9,990 lines, 2.5 MB, for 10,000 requests"
            ),
            "{text}"
        );
        assert!(text.contains("10 lines are missing"), "{text}");
    }

    #[test]
    fn thousands_are_separated() {
        assert_eq!(thousands(0.4), "0");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(81_093.37), "81,093");
        assert_eq!(thousands(1_234_567.0), "1,234,567");
    }
}
