//! `regproxy prefetch|pin [--platform P] REF...` and `regproxy unpin REF...`:
//! ask a running proxy's admin API, and show how it goes. On a terminal a
//! bar per image, redrawn in place (ANSI cursor moves, auto-wrap off while
//! drawing); in a pipe plain lines (resolved, every 10%, done or failed);
//! with `--json` the proxy's NDJSON events as they come. Exit 0 when every
//! image is done, 1 when one failed (see [`super`] for the rest).

use std::collections::VecDeque;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use clap::Args;
use http::Method;
use serde_json::{json, Value};

use super::{Admin, AdminArgs, CtlError, Lines};
use crate::prefetch::{Event, Target};

#[derive(Args, Clone, Debug)]
pub struct PrefetchArgs {
    #[command(flatten)]
    pub admin: AdminArgs,
    /// `os/arch[/variant]` of the image to fetch from an index; default:
    /// the platform of the node the proxy runs on.
    #[arg(long)]
    pub platform: Option<String>,
    /// `[HOST[:PORT]/]NAME(:TAG|@DIGEST)`; the host is dropped (the proxy
    /// has one upstream), no tag means `latest`.
    #[arg(required = true)]
    pub refs: Vec<String>,
}

#[derive(Args, Clone, Debug)]
pub struct UnpinArgs {
    #[command(flatten)]
    pub admin: AdminArgs,
    #[arg(required = true)]
    pub refs: Vec<String>,
}

/// How long rates are averaged over.
const RATE_WINDOW: Duration = Duration::from_secs(5);
/// Width of the bar between its brackets.
const BAR: usize = 20;

/// `regproxy prefetch`, or `regproxy pin` with `pin`: `Ok(true)` when
/// every image is done.
pub async fn prefetch(args: PrefetchArgs, pin: bool) -> Result<bool, CtlError> {
    // Refs and platform are checked here too: a typo is a usage error.
    for r in &args.refs {
        Target::parse(r, args.platform.as_deref()).map_err(CtlError::Usage)?;
    }
    let admin = Admin::new(&args.admin)?;
    let body = json!({"refs": args.refs, "platform": args.platform, "pin": pin});
    let mut lines = Lines::new(
        admin
            .call(Method::POST, "/admin/prefetch", Some(body))
            .await?,
    );
    let stdout = std::io::stdout();
    let json = args.admin.json;
    let mut view = View::new(&args.refs, !json && stdout.is_terminal(), pin);
    let mut out = stdout.lock();
    let failed = loop {
        let v = match lines.next().await {
            Some(Ok(v)) => v,
            Some(Err(e)) => {
                view.finish(&mut out);
                return Err(e);
            }
            None => {
                view.finish(&mut out);
                return Err(CtlError::Broken(
                    "the stream ended before its summary".into(),
                ));
            }
        };
        if json {
            let _ = writeln!(out, "{v}");
            let _ = out.flush();
        }
        if v["event"] == "summary" {
            break v["failed"].as_u64().unwrap_or(1);
        }
        if !json {
            view.event(&v, Instant::now(), &mut out);
        }
    };
    view.finish(&mut out);
    Ok(failed == 0)
}

/// `regproxy unpin`: `Ok(false)` when a ref was not pinned.
pub async fn unpin(args: UnpinArgs) -> Result<bool, CtlError> {
    let admin = Admin::new(&args.admin)?;
    let body = json!({"refs": args.refs});
    let v = admin.json(Method::POST, "/admin/unpin", Some(body)).await?;
    let list = |k: &str| -> Vec<String> {
        v[k].as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|r| Some(r.as_str()?.to_owned()))
                    .collect()
            })
            .unwrap_or_default()
    };
    if args.admin.json {
        println!("{v}");
    } else {
        for r in list("removed") {
            println!("{r}: unpinned");
        }
        for r in list("in_file") {
            println!("{r}: still pinned by the prefetch file (remove its line there)");
        }
        for r in list("not_pinned") {
            println!("{r}: was not pinned");
        }
    }
    Ok(list("not_pinned").is_empty())
}

/// One image's line.
struct Row {
    reference: String,
    state: State,
    /// Bytes done over time, for the rate.
    samples: VecDeque<(Instant, u64)>,
    done: u64,
    total: u64,
    /// The last tenth printed in a pipe.
    tenth: u64,
}

#[derive(PartialEq)]
enum State {
    Waiting,
    Running,
    /// The final line.
    Over(String),
}

/// What the events have said so far, and how it is shown.
struct View {
    rows: Vec<Row>,
    tty: bool,
    pin: bool,
    /// Lines drawn last time (the cursor is below them).
    drawn: usize,
    last_draw: Option<Instant>,
}

impl View {
    fn new(refs: &[String], tty: bool, pin: bool) -> View {
        let rows = refs
            .iter()
            .map(|r| Row {
                reference: r.clone(),
                state: State::Waiting,
                samples: VecDeque::new(),
                done: 0,
                total: 0,
                tenth: 0,
            })
            .collect();
        View {
            rows,
            tty,
            pin,
            drawn: 0,
            last_draw: None,
        }
    }

    fn event(&mut self, v: &Value, now: Instant, out: &mut impl Write) {
        let reference = v["ref"].as_str().unwrap_or_default();
        let Ok(e) = serde_json::from_value::<Event>(v.clone()) else {
            return;
        };
        // A ref given twice: the first whose line is not over yet.
        let Some(i) = self
            .rows
            .iter()
            .position(|r| r.reference == reference && !matches!(r.state, State::Over(_)))
        else {
            return;
        };
        let (tty, pin) = (self.tty, self.pin);
        let row = &mut self.rows[i];
        let mut plain = None;
        let mut over = false;
        match e {
            Event::Resolved {
                digest,
                platform,
                bytes,
                cached,
                blobs,
                ..
            } => {
                row.state = State::Running;
                (row.total, row.done) = (bytes, cached);
                row.samples.push_back((now, cached));
                plain = Some(format!(
                    "{reference}: resolved {digest} ({platform}), {} in {blobs} blobs, {} cached",
                    size(bytes, bytes),
                    size(cached, bytes)
                ));
            }
            Event::Progress { done, total } => {
                (row.done, row.total) = (done, total);
                row.samples.push_back((now, done));
                while row.samples.len() > 2 && now - row.samples[0].0 > RATE_WINDOW {
                    row.samples.pop_front();
                }
                let tenth = (done * 10).checked_div(total).unwrap_or(10);
                if tenth > row.tenth && tenth < 10 {
                    row.tenth = tenth;
                    // A line per tenth passed, saying where it is.
                    let percent = done * 100 / total.max(1);
                    plain = Some(format!("{reference}: {percent}% {}", progress(done, total)));
                }
            }
            Event::Done {
                digest,
                bytes,
                seconds,
                fetched,
                ..
            } => {
                let verb = if pin { "pinned" } else { "done" };
                let shown = if tty { short(&digest) } else { digest.clone() };
                let cached = match bytes - fetched.min(bytes) {
                    0 => String::new(),
                    c => format!(", {} was cached", size(c, bytes)),
                };
                let line = format!(
                    "{reference}: {verb} {shown} {} in {}{cached}",
                    size(bytes, bytes),
                    duration(seconds)
                );
                row.state = State::Over(line.clone());
                (plain, over) = (Some(line), true);
            }
            Event::Failed { error } => {
                let line = format!("{reference}: failed: {error}");
                row.state = State::Over(line.clone());
                (plain, over) = (Some(line), true);
            }
        }
        if !tty {
            if let Some(l) = plain {
                let _ = writeln!(out, "{l}");
                let _ = out.flush();
            }
            return;
        }
        // Redrawn at most 10 times a second, but always for a final line.
        if over
            || self
                .last_draw
                .is_none_or(|t| now - t >= Duration::from_millis(100))
        {
            self.draw(now, out);
        }
    }

    fn draw(&mut self, now: Instant, out: &mut impl Write) {
        let mut s = String::new();
        if self.drawn > 0 {
            s.push_str(&format!("\x1b[{}A", self.drawn));
        }
        // Auto-wrap off: a line wider than the terminal is cut, not
        // wrapped onto a second line the cursor moves would not count.
        s.push_str("\x1b[?7l");
        for row in &self.rows {
            s.push_str("\r\x1b[2K");
            s.push_str(&row.line());
            s.push('\n');
        }
        s.push_str("\x1b[?7h");
        self.drawn = self.rows.len();
        self.last_draw = Some(now);
        let _ = out.write_all(s.as_bytes());
        let _ = out.flush();
    }

    /// The last drawing, so that the final lines stay on the terminal.
    fn finish(&mut self, out: &mut impl Write) {
        if self.tty && self.last_draw.is_some() {
            self.draw(Instant::now(), out);
        }
    }
}

impl Row {
    fn line(&self) -> String {
        let r = &self.reference;
        match &self.state {
            State::Waiting => format!("{r} ..."),
            State::Over(line) => line.clone(),
            State::Running => {
                let filled = (self.done.min(self.total) as u128 * BAR as u128)
                    .checked_div(self.total as u128)
                    .unwrap_or(BAR as u128) as usize;
                let bar = format!("{}{}", "#".repeat(filled), ".".repeat(BAR - filled));
                let mut l = format!("{r} [{bar}] {}", progress(self.done, self.total));
                if let Some(rate) = self.rate() {
                    l.push_str(&format!(" {}/s", size(rate as u64, rate as u64)));
                    if rate > 0.0 {
                        let left = self.total.saturating_sub(self.done) as f64 / rate;
                        l.push_str(&format!(" ETA {}", duration(left)));
                    }
                }
                l
            }
        }
    }

    /// Bytes a second over the last [`RATE_WINDOW`], once there are two samples.
    fn rate(&self) -> Option<f64> {
        let (t0, d0) = *self.samples.front()?;
        let (t1, d1) = *self.samples.back()?;
        let secs = (t1 - t0).as_secs_f64();
        (secs > 0.2).then(|| d1.saturating_sub(d0) as f64 / secs)
    }
}

/// `12.3/40.0 MiB`, in the unit of the total.
fn progress(done: u64, total: u64) -> String {
    let (div, unit) = unit(total);
    format!("{:.1}/{:.1} {unit}", done as f64 / div, total as f64 / div)
}

/// `40.0 MiB`, in the unit `scale` picks.
fn size(n: u64, scale: u64) -> String {
    let (div, unit) = unit(scale);
    format!("{:.1} {unit}", n as f64 / div)
}

fn unit(scale: u64) -> (f64, &'static str) {
    match scale {
        s if s >= 1 << 30 => ((1u64 << 30) as f64, "GiB"),
        s if s >= 1 << 20 => ((1u64 << 20) as f64, "MiB"),
        _ => (1024.0, "KiB"),
    }
}

/// `19s`, `2m05s`, `1h02m`.
fn duration(secs: f64) -> String {
    let s = secs.round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

/// `sha256:0123456789ab…`.
fn short(digest: &str) -> String {
    match digest.get(..19) {
        Some(head) if digest.len() > 19 => format!("{head}…"),
        _ => digest.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    const MIB: u64 = 1 << 20;

    fn feed(view: &mut View, events: &[(u64, Value)]) -> String {
        let start = Instant::now();
        let mut out = Vec::new();
        for (ms, v) in events {
            view.event(v, start + Duration::from_millis(*ms), &mut out);
        }
        String::from_utf8(out).unwrap()
    }

    fn events() -> Vec<(u64, Value)> {
        vec![
            (
                0,
                json!({"event":"resolved","ref":"app:v1","digest":D,"manifest":D,"platform":"linux/amd64","bytes":40*MIB,"cached":0,"blobs":3}),
            ),
            (
                1000,
                json!({"event":"progress","ref":"app:v1","done":4*MIB,"total":40*MIB}),
            ),
            (
                2000,
                json!({"event":"progress","ref":"app:v1","done":8*MIB,"total":40*MIB}),
            ),
            (
                3000,
                json!({"event":"progress","ref":"app:v1","done":13*MIB,"total":40*MIB}),
            ),
            (
                4000,
                json!({"event":"failed","ref":"other","error":"manifest other:latest: 404 Not Found MANIFEST_UNKNOWN"}),
            ),
            (
                19000,
                json!({"event":"done","ref":"app:v1","digest":D,"bytes":40*MIB,"fetched":40*MIB,"seconds":19.2,"pinned":false}),
            ),
        ]
    }

    #[test]
    fn a_terminal_gets_bars_redrawn_in_place() {
        let refs = ["app:v1".to_owned(), "other".to_owned()];
        let mut view = View::new(&refs, true, false);
        let out = feed(&mut view, &events()[..4]);
        let last = out.rsplit("\x1b[2A").next().unwrap();
        assert!(
            last.contains("app:v1 [######..............] 13.0/40.0 MiB 4.3 MiB/s ETA 6s"),
            "the last drawing shows the bar, the rate over the samples and the ETA: {last:?}"
        );
        assert!(
            last.contains("other ..."),
            "a ref not started yet waits: {last:?}"
        );
        let out = feed(&mut view, &events()[4..]);
        let last = out.rsplit("\x1b[2A").next().unwrap();
        assert!(
            last.contains("app:v1: done sha256:e3b0c44298fc… 40.0 MiB in 19s\n"),
            "{last:?}"
        );
        assert!(
            last.contains("other: failed: manifest other:latest: 404"),
            "{last:?}"
        );
    }

    #[test]
    fn a_pipe_gets_plain_lines() {
        let refs = ["app:v1".to_owned(), "other".to_owned()];
        let mut view = View::new(&refs, false, true);
        let out = feed(&mut view, &events());
        assert!(
            !out.contains('\x1b'),
            "no escape sequences in a pipe: {out:?}"
        );
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines,
            [
                format!("app:v1: resolved {D} (linux/amd64), 40.0 MiB in 3 blobs, 0.0 MiB cached")
                    .as_str(),
                "app:v1: 10% 4.0/40.0 MiB",
                "app:v1: 20% 8.0/40.0 MiB",
                "app:v1: 32% 13.0/40.0 MiB",
                "other: failed: manifest other:latest: 404 Not Found MANIFEST_UNKNOWN",
                format!("app:v1: pinned {D} 40.0 MiB in 19s").as_str(),
            ],
            "a line per tenth passed, at most"
        );
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(progress(3 * MIB / 2, 40 * MIB), "1.5/40.0 MiB");
        assert_eq!(size(2048, 4096), "2.0 KiB");
        assert_eq!(size(3 << 30, 3 << 30), "3.0 GiB");
        assert_eq!(duration(0.4), "0s");
        assert_eq!(duration(125.0), "2m05s");
        assert_eq!(duration(3720.0), "1h02m");
        assert_eq!(short(D), "sha256:e3b0c44298fc…");
    }
}
