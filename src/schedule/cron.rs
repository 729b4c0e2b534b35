//! Tick arithmetic, pure: the cron expression and time zone parsed once, the next tick, which
//! missed tick (if any) to run now as CronJob does, and the names of the runs ticks create.

use croner::parser::{CronParser, Seconds, Year};
use jiff::Timestamp;
use jiff::tz::TimeZone;

/// Missed ticks counted at most; more than this is "too many" (a Warning Event, one run only).
pub const MAX_MISSED: usize = 100;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error(
        "invalid schedule {expr:?}: {message} (5 fields, 6 with a leading seconds field, or @hourly, @daily, @weekly, @monthly, @yearly)"
    )]
    Schedule { expr: String, message: String },
    #[error("unknown time zone {0:?} (an IANA name such as UTC or Europe/Paris)")]
    TimeZone(String),
}

impl Invalid {
    /// The condition's and the Event's reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Invalid::Schedule { .. } => "InvalidSchedule",
            Invalid::TimeZone(_) => "InvalidTimeZone",
        }
    }
}

/// A cron expression read in a time zone.
#[derive(Debug, Clone)]
pub struct Cron {
    cron: croner::Cron,
    tz: TimeZone,
}

/// Parses `expr` (5 fields, 6 with leading seconds, or an @-macro) in `time_zone` (default UTC).
pub fn parse(expr: &str, time_zone: Option<&str>) -> Result<Cron, Invalid> {
    let tz = match time_zone {
        None => TimeZone::UTC,
        Some(name) => TimeZone::get(name).map_err(|_| Invalid::TimeZone(name.to_string()))?,
    };
    let trimmed = expr.trim();
    // Vixie cron's @midnight is @daily; croner knows the others.
    let pattern = if trimmed.eq_ignore_ascii_case("@midnight") { "@daily" } else { trimmed };
    let invalid = |message: String| Invalid::Schedule { expr: expr.to_string(), message };
    if pattern.starts_with('@') {
        let known = ["@yearly", "@annually", "@monthly", "@weekly", "@daily", "@hourly"];
        if !known.iter().any(|k| k.eq_ignore_ascii_case(pattern)) {
            return Err(invalid(format!("unknown macro {pattern}")));
        }
    }
    let parser = CronParser::builder().seconds(Seconds::Optional).year(Year::Disallowed).build();
    let cron = parser.parse(pattern).map_err(|e| invalid(e.to_string()))?;
    Ok(Cron { cron, tz })
}

impl Cron {
    /// The first tick strictly after `t`.
    pub fn next_after(&self, t: Timestamp) -> Option<Timestamp> {
        self.cron.find_next_occurrence(&t.to_zoned(self.tz.clone()), false).ok().map(|z| z.timestamp())
    }

    /// The last tick at or before `t`.
    pub fn last_at_or_before(&self, t: Timestamp) -> Option<Timestamp> {
        // Ticks are whole seconds: a tick in the same second as `t` is at or before it.
        let second = Timestamp::from_second(t.as_second()).ok()?;
        self.cron
            .find_previous_occurrence(&second.to_zoned(self.tz.clone()), true)
            .ok()
            .map(|z| z.timestamp())
    }
}

/// What a pass over a schedule does about ticks, as CronJob decides it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The tick to create a run for now: the most recent one since the last, if within the deadline.
    pub run: Option<Timestamp>,
    /// The most recent tick missed by more than `startingDeadlineSeconds` (no run for it).
    pub too_late: Option<Timestamp>,
    /// Ticks passed since the last one (counted up to `MAX_MISSED + 1`).
    pub missed: usize,
    /// The first tick after `now`.
    pub next: Option<Timestamp>,
}

impl Plan {
    pub fn too_many_missed(&self) -> bool {
        self.missed > MAX_MISSED
    }
}

/// Ticks in (`last`, `now`]: `last` is the status' lastScheduleTime, else the schedule's creation.
/// With `deadline` (seconds), ticks older than `now - deadline` are never run.
pub fn plan(cron: &Cron, last: Timestamp, now: Timestamp, deadline: Option<i64>) -> Plan {
    let cutoff = deadline.and_then(|d| now.checked_sub(jiff::SignedDuration::from_secs(d)).ok());
    let earliest = match cutoff {
        Some(c) if c > last => c,
        _ => last,
    };
    let most_recent = cron.last_at_or_before(now).filter(|t| *t > earliest);
    let mut missed = 0;
    if most_recent.is_some() {
        let mut t = earliest;
        while missed <= MAX_MISSED {
            match cron.next_after(t) {
                Some(n) if n <= now => {
                    missed += 1;
                    t = n;
                }
                _ => break,
            }
        }
    }
    // A tick between the last one and the cutoff was skipped: too late to run.
    let too_late = match (most_recent, cutoff) {
        (None, Some(c)) if c > last => cron.last_at_or_before(c).filter(|t| *t > last),
        _ => None,
    };
    Plan { run: most_recent, too_late, missed, next: cron.next_after(now) }
}

/// The run a tick creates: `<schedule>-<tick in unix seconds>`, the same in every controller.
pub fn tick_run_name(schedule: &str, tick: Timestamp) -> String {
    crate::job::child_name(schedule, &tick.as_second().to_string())
}

/// A run started by hand (`POST /schedules/{name}/run`).
pub fn manual_run_name(schedule: &str, now: Timestamp) -> String {
    crate::job::child_name(schedule, &format!("manual-{}", now.as_second()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn expressions_parse_or_say_why_not() {
        for ok in [
            "*/5 * * * *",
            "0 3 * * 1-5",
            "*/3 * * * * *",
            "@hourly",
            "@daily",
            "@weekly",
            "@monthly",
            "@yearly",
            "@annually",
            "@midnight",
            "@DAILY",
            "0 9 * JAN MON",
        ] {
            assert!(parse(ok, None).is_ok(), "{ok}: {:?}", parse(ok, None).err());
        }
        for bad in
            ["", "* * * *", "* * * * * * *", "61 * * * *", "@reboot", "@every 5m", "x * * * *", "*/0 * * * *"]
        {
            let err = parse(bad, None).expect_err(bad);
            assert_eq!(err.reason(), "InvalidSchedule", "{bad}");
            assert!(err.to_string().contains("invalid schedule"), "{err}");
        }
        let err = parse("@daily", Some("Mars/Olympus")).unwrap_err();
        assert_eq!(err, Invalid::TimeZone("Mars/Olympus".into()));
        assert_eq!(err.reason(), "InvalidTimeZone");
        assert!(parse("@daily", Some("Europe/Paris")).is_ok());
    }

    #[test]
    fn next_ticks() {
        let cases = [
            ("*/5 * * * *", None, "2026-03-01T10:02:30Z", "2026-03-01T10:05:00Z"),
            ("*/5 * * * *", None, "2026-03-01T10:05:00Z", "2026-03-01T10:10:00Z"),
            ("*/3 * * * * *", None, "2026-03-01T10:00:01.500Z", "2026-03-01T10:00:03Z"),
            ("*/3 * * * * *", None, "2026-03-01T10:00:03Z", "2026-03-01T10:00:06Z"),
            ("@hourly", None, "2026-03-01T10:00:00Z", "2026-03-01T11:00:00Z"),
            ("@daily", None, "2026-03-01T10:00:00Z", "2026-03-02T00:00:00Z"),
            ("@midnight", None, "2026-03-01T10:00:00Z", "2026-03-02T00:00:00Z"),
            ("@weekly", None, "2026-03-04T10:00:00Z", "2026-03-08T00:00:00Z"),
            ("@monthly", None, "2026-03-04T10:00:00Z", "2026-04-01T00:00:00Z"),
            ("@yearly", None, "2026-03-04T10:00:00Z", "2027-01-01T00:00:00Z"),
            // 02:00 in Paris is 00:00 UTC in summer, 01:00 UTC in winter.
            ("0 2 * * *", Some("Europe/Paris"), "2026-07-01T12:00:00Z", "2026-07-02T00:00:00Z"),
            ("0 2 * * *", Some("Europe/Paris"), "2026-01-01T12:00:00Z", "2026-01-02T01:00:00Z"),
            // Daylight saving: 02:30 does not exist on 29 March (runs right after the gap, 03:00
            // CEST), and happens twice on 25 October (runs once, the first time).
            ("30 2 * * *", Some("Europe/Paris"), "2026-03-28T12:00:00Z", "2026-03-29T01:00:00Z"),
            ("30 2 * * *", Some("Europe/Paris"), "2026-10-25T00:00:00Z", "2026-10-25T00:30:00Z"),
            ("30 2 * * *", Some("Europe/Paris"), "2026-10-25T00:30:00Z", "2026-10-26T01:30:00Z"),
        ];
        for (expr, tz, now, next) in cases {
            let cron = parse(expr, tz).unwrap();
            assert_eq!(cron.next_after(ts(now)), Some(ts(next)), "{expr} {tz:?} after {now}");
        }
    }

    #[test]
    fn plans_as_cronjob() {
        let every_minute = parse("* * * * *", None).unwrap();
        let t = ts;
        // (last, now, deadline) -> (run, too_late, missed, next)
        type Case<'a> = (&'a str, &'a str, Option<i64>, Option<&'a str>, Option<&'a str>, usize, &'a str);
        let cases: [Case; 7] = [
            // Nothing due yet.
            ("2026-03-01T10:00:00Z", "2026-03-01T10:00:30Z", None, None, None, 0, "2026-03-01T10:01:00Z"),
            // One tick due, on time.
            (
                "2026-03-01T10:00:00Z",
                "2026-03-01T10:01:00.200Z",
                None,
                Some("2026-03-01T10:01:00Z"),
                None,
                1,
                "2026-03-01T10:02:00Z",
            ),
            // Three ticks missed: one run, for the most recent.
            (
                "2026-03-01T10:00:00Z",
                "2026-03-01T10:03:10Z",
                None,
                Some("2026-03-01T10:03:00Z"),
                None,
                3,
                "2026-03-01T10:04:00Z",
            ),
            // Missed, but within the deadline.
            (
                "2026-03-01T10:00:00Z",
                "2026-03-01T10:03:10Z",
                Some(30),
                Some("2026-03-01T10:03:00Z"),
                None,
                1,
                "2026-03-01T10:04:00Z",
            ),
            // Missed by more than the deadline: no run, the skipped tick named.
            (
                "2026-03-01T10:00:00Z",
                "2026-03-01T10:03:40Z",
                Some(30),
                None,
                Some("2026-03-01T10:03:00Z"),
                0,
                "2026-03-01T10:04:00Z",
            ),
            // Down for a day: more than 100 missed, still one run.
            (
                "2026-03-01T10:00:00Z",
                "2026-03-02T10:00:05Z",
                None,
                Some("2026-03-02T10:00:00Z"),
                None,
                MAX_MISSED + 1,
                "2026-03-02T10:01:00Z",
            ),
            // A last tick in the future (a clock step back): nothing.
            ("2026-03-01T11:00:00Z", "2026-03-01T10:00:30Z", None, None, None, 0, "2026-03-01T10:01:00Z"),
        ];
        for (last, now, deadline, run, too_late, missed, next) in cases {
            let p = plan(&every_minute, t(last), t(now), deadline);
            assert_eq!(p.run, run.map(t), "run: {last} {now} {deadline:?}");
            assert_eq!(p.too_late, too_late.map(t), "too_late: {last} {now} {deadline:?}");
            assert_eq!(p.missed, missed, "missed: {last} {now} {deadline:?}");
            assert_eq!(p.next, Some(t(next)), "next: {last} {now} {deadline:?}");
        }
        assert!(
            plan(&every_minute, t("2026-03-01T10:00:00Z"), t("2026-03-02T10:00:05Z"), None).too_many_missed()
        );
    }

    #[test]
    fn run_names_are_deterministic_and_fit() {
        let tick = ts("2026-03-01T10:00:03Z");
        assert_eq!(tick_run_name("nightly", tick), format!("nightly-{}", tick.as_second()));
        assert_eq!(manual_run_name("nightly", tick), format!("nightly-manual-{}", tick.as_second()));
        let long = "a".repeat(63);
        let name = tick_run_name(&long, tick);
        assert_eq!(name.len(), 63, "{name}");
        assert_eq!(name, tick_run_name(&long, tick), "the same in every controller");
        assert!(name.ends_with(&format!("-{}", tick.as_second())));
        let other = format!("{}b", "a".repeat(62));
        assert_ne!(tick_run_name(&other, tick), name, "cut names keep a hash of the whole");
        let manual = manual_run_name(&long, tick);
        assert!(manual.len() <= 63 && manual.ends_with(&format!("-manual-{}", tick.as_second())), "{manual}");
        // A cut never leaves "-." or ".-" behind.
        let dotted = format!("{}.{}", "a".repeat(42), "b".repeat(20));
        let name = tick_run_name(&dotted, tick);
        assert!(name.len() <= 63 && !name.contains(".-") && !name.contains("--"), "{name}");
    }
}
