//! `regproxy cache ls|rm|verify`: the admin's view of a running proxy's
//! cache (see `crate::cache::admin` for what each does on the proxy).
//!
//! - `ls [--sort last-use|size|digest|repo]`: a table, newest use first by
//!   default, and a total line `N entries, X (of CAP)`.
//! - `rm DIGEST|REF`: exits 1 when the proxy refuses (content in use or
//!   pinned: 409) or has nothing of it.
//! - `verify [--rate 50MiB/s]`: progress lines, then the report; exits 1
//!   if anything was corrupt (and removed) or could not be read.
//!
//! `--json` prints the proxy's answers as they are (NDJSON for `verify`).

use std::time::{SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand, ValueEnum};
use http::Method;
use serde_json::{json, Value};

use super::{Admin, AdminArgs, CtlError, Lines};

#[derive(Args, Clone, Debug)]
pub struct CacheArgs {
    #[command(subcommand)]
    pub command: CacheCommand,
}

#[derive(Subcommand, Clone, Debug)]
pub enum CacheCommand {
    /// List the cached content: digest, kind, size, last use, pinned, and
    /// the repositories (with tags) it was served under.
    Ls {
        #[command(flatten)]
        admin: AdminArgs,
        /// Order of the rows (last-use: most recent first; size: largest first).
        #[arg(long, value_enum, default_value_t = Sort::LastUse)]
        sort: Sort,
    },
    /// Remove a digest, or a ref's manifest with the blobs it lists (and
    /// its tag). Refused while any of it is being served or filled, or pinned.
    Rm {
        #[command(flatten)]
        admin: AdminArgs,
        /// `sha256:<hex>`, or `[HOST/]NAME[:TAG|@DIGEST]`.
        target: String,
    },
    /// Re-hash everything cached at a bounded read rate; remove what no
    /// longer matches its digest. Exits 1 if anything did.
    Verify {
        #[command(flatten)]
        admin: AdminArgs,
        /// Most bytes read per second (`50MiB/s`, `off` for no limit).
        #[arg(long, default_value = "50MiB/s")]
        rate: String,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sort {
    Size,
    LastUse,
    Digest,
    Repo,
}

/// Runs a `cache` command: Ok(false) when the command ran and found
/// something wrong (exit 1).
pub async fn run(a: CacheArgs) -> Result<bool, CtlError> {
    match a.command {
        CacheCommand::Ls { admin, sort } => ls(&admin, sort).await,
        CacheCommand::Rm { admin, target } => rm(&admin, &target).await,
        CacheCommand::Verify { admin, rate } => verify(&admin, &rate).await,
    }
}

async fn ls(a: &AdminArgs, sort: Sort) -> Result<bool, CtlError> {
    let answer = Admin::new(a)?
        .json(Method::GET, "/admin/cache", None)
        .await?;
    if a.json {
        println!("{answer}");
    } else {
        print!("{}", table(&answer, sort, now_unix()));
    }
    Ok(true)
}

async fn rm(a: &AdminArgs, target: &str) -> Result<bool, CtlError> {
    let body = json!({ "target": target });
    let answer = Admin::new(a)?
        .json(Method::POST, "/admin/cache/rm", Some(body))
        .await?;
    if a.json {
        println!("{answer}");
        return Ok(true);
    }
    for r in answer["removed"].as_array().into_iter().flatten() {
        let size = r["size"].as_u64().unwrap_or(0);
        println!("removed {} ({})", text(&r["digest"]), human(size));
    }
    if let Some(t) = answer["untagged"].as_str() {
        println!("forgot the tag {t}");
    }
    let bytes = answer["bytes"].as_u64().unwrap_or(0);
    println!("{} freed", human(bytes));
    Ok(true)
}

async fn verify(a: &AdminArgs, rate: &str) -> Result<bool, CtlError> {
    crate::units::parse_rate(rate).map_err(|e| CtlError::Usage(format!("--rate: {e}")))?;
    let body = json!({ "rate": rate });
    let stream = Admin::new(a)?
        .call(Method::POST, "/admin/cache/verify", Some(body))
        .await?;
    let mut lines = Lines::new(stream);
    while let Some(line) = lines.next().await {
        let v = line?;
        if a.json {
            println!("{v}");
        } else {
            println!("{}", event(&v));
        }
        if v["event"] == "report" {
            let bad = v["bad"].as_array().is_some_and(|b| !b.is_empty());
            let errors = v["errors"].as_array().is_some_and(|e| !e.is_empty());
            return Ok(!bad && !errors);
        }
    }
    Err(CtlError::Broken(
        "the verify ended without its report".into(),
    ))
}

/// One line of `verify`'s output for people.
fn event(v: &Value) -> String {
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    match v["event"].as_str().unwrap_or("") {
        "start" => format!(
            "verifying {} entries, {}, at {}",
            n("entries"),
            human(n("bytes")),
            match n("rate") {
                0 => "no rate limit".to_owned(),
                r => format!("{}/s", human(r)),
            }
        ),
        "progress" => format!(
            "checked {}/{} entries, {} of {}",
            n("checked"),
            n("entries"),
            human(n("bytes")),
            human(n("total_bytes"))
        ),
        "bad" => format!(
            "BAD {} ({}): {}; {}",
            text(&v["digest"]),
            human(n("size")),
            text(&v["why"]),
            if v["removed"] == true {
                "removed"
            } else {
                "already gone"
            }
        ),
        "report" => {
            let bad = v["bad"].as_array().map_or(0, Vec::len);
            let errors = v["errors"].as_array().cloned().unwrap_or_default();
            let mut s = format!(
                "checked {} entries, {}, in {:.1} s: ",
                n("checked"),
                human(n("bytes")),
                v["seconds"].as_f64().unwrap_or(0.0)
            );
            s += &match bad {
                0 => "nothing corrupt".to_owned(),
                1 => "1 corrupt entry removed".to_owned(),
                k => format!("{k} corrupt entries removed"),
            };
            for e in errors {
                s += &format!(
                    "\ncould not read {}: {}",
                    text(&e["digest"]),
                    text(&e["error"])
                );
            }
            s
        }
        _ => v.to_string(),
    }
}

/// `cache ls` as a table, rows in `sort` order, and the total line.
fn table(answer: &Value, sort: Sort, now: u64) -> String {
    let mut rows: Vec<&Value> = answer["entries"].as_array().into_iter().flatten().collect();
    let used = |r: &Value| r["last_use_unix"].as_u64().unwrap_or(0);
    match sort {
        Sort::LastUse => rows.sort_by_key(|r| std::cmp::Reverse(used(r))),
        Sort::Size => rows.sort_by_key(|r| std::cmp::Reverse(r["size"].as_u64().unwrap_or(0))),
        Sort::Digest => rows.sort_by_key(|r| text(&r["digest"])),
        // Rows seen under no repository last.
        Sort::Repo => rows.sort_by_key(|r| {
            let w = where_seen(r);
            (w.is_empty(), w)
        }),
    }
    let mut out = format!(
        "{:<71}  {:<8}  {:>10}  {:>9}  {:<6}  REPOSITORIES\n",
        "DIGEST", "KIND", "SIZE", "LAST USE", "PINNED"
    );
    for r in rows {
        out += &format!(
            "{:<71}  {:<8}  {:>10}  {:>9}  {:<6}  {}\n",
            text(&r["digest"]),
            text(&r["kind"]),
            human(r["size"].as_u64().unwrap_or(0)),
            ago(now, used(r)),
            if r["pinned"] == true { "yes" } else { "no" },
            where_seen(r)
        );
    }
    let t = &answer["total"];
    let entries = t["entries"].as_u64().unwrap_or(0);
    out += &format!(
        "{entries} {}, {} (of {})\n",
        if entries == 1 { "entry" } else { "entries" },
        human(t["bytes"].as_u64().unwrap_or(0)),
        human(t["capacity"].as_u64().unwrap_or(0))
    );
    out
}

/// `repo:tag1,tag2 other/repo`: the repositories seen, with their tags that
/// point at this entry, and tagged repositories not seen since a restart.
fn where_seen(r: &Value) -> String {
    let mut repos: Vec<(String, Vec<String>)> = Vec::new();
    let mut add = |repo: &str, tag: Option<&str>| {
        let i = match repos.iter().position(|(n, _)| n == repo) {
            Some(i) => i,
            None => {
                repos.push((repo.to_owned(), Vec::new()));
                repos.len() - 1
            }
        };
        if let Some(t) = tag {
            repos[i].1.push(t.to_owned());
        }
    };
    for repo in r["repositories"].as_array().into_iter().flatten() {
        add(&text(repo), None);
    }
    for t in r["tags"].as_array().into_iter().flatten() {
        let t = text(t);
        if let Some((repo, tag)) = t.rsplit_once(':') {
            add(repo, Some(tag));
        }
    }
    repos.sort();
    let shown: Vec<String> = repos
        .into_iter()
        .map(|(n, tags)| match tags.is_empty() {
            true => n,
            false => format!("{n}:{}", tags.join(",")),
        })
        .collect();
    shown.join(" ")
}

fn text(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_owned)
}

/// `512 B`, `3.2 MiB`, `1.0 GiB`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

/// How long before `now` a time was: `12s ago`, `5m ago`, `3h ago`, `2d ago`.
fn ago(now: u64, then: u64) -> String {
    let s = now.saturating_sub(then);
    match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}m ago", s / 60),
        3600..86400 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_ages_read_as_people_write_them() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(10 << 30), "10.0 GiB");
        assert_eq!(ago(100, 88), "12s ago");
        assert_eq!(ago(20_000, 20_000 - 3 * 3600), "3h ago");
    }

    #[test]
    fn the_table_sorts_and_totals() {
        let entry = |d: char, size: u64, used: u64, repos: Value, tags: Value| {
            json!({"digest": format!("sha256:{}", d.to_string().repeat(64)), "size": size,
                   "kind": "blob", "repositories": repos, "tags": tags,
                   "last_use_unix": used, "pinned": false})
        };
        let answer = json!({
            "entries": [
                entry('a', 10, 50, json!(["team/b"]), json!([])),
                entry('b', 3 << 20, 90, json!([]), json!(["team/a:v1", "team/a:latest"])),
                entry('c', 5, 70, json!(["x"]), json!([])),
            ],
            "total": {"entries": 3, "bytes": (3 << 20) + 15, "capacity": 1u64 << 30},
        });
        let rows = |sort| -> Vec<char> {
            table(&answer, sort, 100)
                .lines()
                .skip(1)
                .filter_map(|l| l.strip_prefix("sha256:")?.chars().next())
                .collect()
        };
        assert_eq!(rows(Sort::LastUse), vec!['b', 'c', 'a'], "newest use first");
        assert_eq!(rows(Sort::Size), vec!['b', 'a', 'c'], "largest first");
        assert_eq!(rows(Sort::Digest), vec!['a', 'b', 'c']);
        assert_eq!(rows(Sort::Repo), vec!['b', 'a', 'c'], "team/a, team/b, x");
        let t = table(&answer, Sort::LastUse, 100);
        assert!(
            t.contains("team/a:v1,latest"),
            "tags go with their repository:\n{t}"
        );
        assert!(t.contains("3.0 MiB") && t.contains("10s ago"), "{t}");
        assert!(
            t.ends_with("3 entries, 3.0 MiB (of 1.0 GiB)\n"),
            "a total line ends the table:\n{t}"
        );
    }
}
