//! Human output: aligned columns, and times as "in 4m" / "12s ago".

use chrono::{DateTime, Utc};

/// A table with a header row; columns are padded to their widest cell.
#[derive(Debug, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row. A cell's control characters (a reason's line break, a tab) are shown
    /// escaped (`\n`), so each row stays one line and the columns line up; what was
    /// stored is unchanged, and `-o json` shows it as it is.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(
            cells
                .into_iter()
                .map(|c| {
                    if c.chars().any(char::is_control) {
                        c.chars()
                            .map(|ch| {
                                if ch.is_control() {
                                    ch.escape_default().to_string()
                                } else {
                                    ch.to_string()
                                }
                            })
                            .collect()
                    } else {
                        c
                    }
                })
                .collect(),
        );
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table as text, one line per row, no trailing spaces.
    pub fn render(&self) -> String {
        let cols = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate().take(cols) {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let mut out = String::new();
            for (i, c) in cells.iter().enumerate().take(cols) {
                if i + 1 == cols {
                    out.push_str(c);
                } else {
                    out.push_str(&format!("{c:<w$}  ", w = widths[i]));
                }
            }
            out.trim_end().to_string()
        };
        let mut out = line(&self.header);
        out.push('\n');
        for r in &self.rows {
            out.push_str(&line(r));
            out.push('\n');
        }
        out
    }
}

fn span(secs: i64) -> String {
    let s = secs.unsigned_abs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", s / 60),
        3600..=172_799 => {
            let (h, m) = (s / 3600, (s % 3600) / 60);
            if m == 0 || h >= 10 {
                format!("{h}h")
            } else {
                format!("{h}h{m}m")
            }
        }
        _ => format!("{}d", s / 86_400),
    }
}

/// `in 4m` for a future time, `12s ago` for a past one (and `0s ago` for a time within
/// the second, which is how heartbeats just received look).
pub fn relative(t: DateTime<Utc>, now: DateTime<Utc>) -> String {
    // To the nearest second: a 1h ban listed a moment after it was made is `in 1h`, not
    // `in 59m`.
    let secs = ((t - now).num_milliseconds() as f64 / 1000.0).round() as i64;
    if secs > 0 {
        format!("in {}", span(secs))
    } else {
        format!("{} ago", span(secs))
    }
}

/// A duration in seconds as `2h3m`.
pub fn uptime(secs: u64) -> String {
    span(secs.min(i64::MAX as u64) as i64)
}

/// An RFC 3339 time to the second.
pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cell_with_a_line_break_stays_on_its_row() {
        let mut t = Table::new(&["ID", "REASON"]);
        t.row(vec!["m1".into(), "two\nlines\tand a tab".into()]);
        assert_eq!(t.render(), "ID  REASON\nm1  two\\nlines\\tand a tab\n");
    }

    #[test]
    fn columns_align_and_times_read_naturally() {
        let mut t = Table::new(&["ID", "VERSION", "MODE"]);
        t.row(vec!["login-burst".into(), "3".into(), "enforce".into()]);
        t.row(vec!["a".into(), "12".into(), "".into()]);
        assert_eq!(
            t.render(),
            "ID           VERSION  MODE\nlogin-burst  3        enforce\na            12\n"
        );
        let now = Utc::now();
        assert_eq!(relative(now + chrono::Duration::seconds(245), now), "in 4m");
        let just_made = now + chrono::Duration::days(7) - chrono::Duration::milliseconds(40);
        assert_eq!(relative(just_made, now), "in 7d");
        assert_eq!(
            relative(now - chrono::Duration::seconds(12), now),
            "12s ago"
        );
        assert_eq!(uptime(7380), "2h3m");
        assert_eq!(uptime(3 * 86_400), "3d");
    }
}
