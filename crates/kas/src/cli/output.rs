//! How admin commands print: errors that are only a closed pipe, times for people.

/// `println!` that returns an error instead of panicking when stdout is gone
/// (`kas agent list | head`); that error is marked [`StdoutClosed`].
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*).map_err($crate::cli::output::on_stdout)
    }};
}

pub(crate) use out;

/// The mark of a write to our standard output that failed because its reader went away.
/// Only this is "not worth an error": a broken pipe anywhere else (the connection to kas, a
/// tunnel, a socket of `serve`) is a failure and must not end in exit code 0.
#[derive(Debug, thiserror::Error)]
#[error("standard output was closed by its reader")]
pub struct StdoutClosed;

/// Marks a broken pipe of a write to standard output as [`StdoutClosed`]; other errors pass.
pub fn on_stdout(e: std::io::Error) -> std::io::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::io::Error::new(std::io::ErrorKind::BrokenPipe, StdoutClosed)
    } else {
        e
    }
}

/// Standard output as a writer whose broken pipe is marked [`StdoutClosed`] (for code that
/// takes any `Write`, such as `kas agent diff`'s printer).
pub struct Stdout;

impl std::io::Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        std::io::stdout().write(buf).map_err(on_stdout)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush().map_err(on_stdout)
    }
}

/// Whether `e` is only the reader of our standard output having gone away: not worth an
/// error, as with any Unix tool whose output is cut short by `head`.
pub fn is_stdout_closed(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.is::<StdoutClosed>()
            || c.downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::get_ref)
                .is_some_and(|inner| inner.is::<StdoutClosed>())
    })
}

/// A command whose output already said what went wrong: exit with `code`, saying nothing more.
#[derive(Debug, thiserror::Error)]
#[error("exit code {code}")]
pub struct Reported {
    pub code: u8,
}

/// Unix seconds as an RFC 3339 UTC time, for people (raw epoch seconds in listings were not).
pub fn when(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

/// How a listing or status is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns for people.
    Table,
    /// The admin API's JSON, pretty-printed.
    Json,
    /// The same as YAML.
    Yaml,
}

/// `-o table|json|yaml`, and the older `--json`.
#[derive(Debug, Clone, clap::Args)]
pub struct FormatArgs {
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    output: OutputFormat,
    /// Same as `-o json` (kept for scripts written before `-o`).
    #[arg(long, conflicts_with = "output")]
    json: bool,
}

impl FormatArgs {
    pub fn format(&self) -> OutputFormat {
        if self.json {
            OutputFormat::Json
        } else {
            self.output
        }
    }
}

/// Prints `value` as JSON or YAML; false for `Table`, which the caller prints its own way.
pub fn print_data<T: serde::Serialize>(format: OutputFormat, value: &T) -> anyhow::Result<bool> {
    match format {
        OutputFormat::Table => return Ok(false),
        OutputFormat::Json => out!("{}", serde_json::to_string_pretty(value)?)?,
        OutputFormat::Yaml => {
            let yaml = serde_saphyr::to_string(value)?;
            out!("{}", yaml.trim_end())?;
        }
    }
    Ok(true)
}

/// A table whose columns are as wide as their widest cell: long project paths widen their
/// column instead of being cut or pushing the others out of line.
#[derive(Debug, Default)]
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Self {
        Self {
            rows: vec![headers.iter().map(|h| (*h).to_owned()).collect()],
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Each column's width: its widest cell.
    fn natural_widths(&self) -> Vec<usize> {
        let mut widths: Vec<usize> = Vec::new();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate() {
                let w = cell.chars().count();
                match widths.get_mut(i) {
                    Some(max) => *max = (*max).max(w),
                    None => widths.push(w),
                }
            }
        }
        widths
    }

    /// The lines, columns separated by two spaces, without trailing blanks; fitted to `width`
    /// columns when given: the widest column other
    /// than the identifying one (the second: the agent, the project path) gives way first,
    /// down to [`MIN_CUT`] characters, its cells cut with `…`. The identifying column is never
    /// cut; a line may still be wider than `width` when it alone does not fit.
    pub fn render_within(&self, width: Option<usize>) -> Vec<String> {
        let mut widths = self.natural_widths();
        if let Some(width) = width {
            shrink(&mut widths, width);
        }
        self.rows
            .iter()
            .map(|row| {
                let mut line = String::new();
                for (i, cell) in row.iter().enumerate() {
                    let cell = cut(cell, widths[i]);
                    line.push_str(&cell);
                    if i + 1 < row.len() {
                        let pad = widths[i].saturating_sub(cell.chars().count());
                        line.push_str(&" ".repeat(pad + 2));
                    }
                }
                line.trim_end().to_owned()
            })
            .collect()
    }

    /// Prints the table, fitted to the terminal's width on a terminal; piped, whole (for
    /// scripts and for `less -S`).
    pub fn print(&self) -> anyhow::Result<()> {
        use std::io::IsTerminal as _;
        let width = std::io::stdout()
            .is_terminal()
            .then(|| console::Term::stdout().size_checked())
            .flatten()
            .map(|(_, cols)| usize::from(cols));
        for line in self.render_within(width) {
            out!("{line}")?;
        }
        Ok(())
    }
}

/// The narrowest a column is cut to.
pub const MIN_CUT: usize = 8;

/// The column that identifies a row (the agent, the project path): never cut.
const IDENTIFYING: usize = 1;

/// Narrows the widest cuttable column, one character at a time, until the line fits.
fn shrink(widths: &mut [usize], width: usize) {
    let total = |w: &[usize]| w.iter().sum::<usize>() + 2 * w.len().saturating_sub(1);
    while total(widths) > width {
        let widest = widths
            .iter()
            .enumerate()
            .filter(|(i, w)| *i != IDENTIFYING && **w > MIN_CUT)
            .max_by_key(|(_, w)| **w)
            .map(|(i, _)| i);
        match widest {
            Some(i) => widths[i] -= 1,
            None => return,
        }
    }
}

/// `cell` in at most `width` characters, ending in `…` when cut.
fn cut(cell: &str, width: usize) -> String {
    if cell.chars().count() <= width {
        return cell.to_owned();
    }
    let mut out: String = cell.chars().take(width.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// A commit id shortened for tables.
pub fn short(commit: &str) -> &str {
    &commit[..commit.len().min(12)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_grow_with_their_longest_cell_and_nothing_is_cut() {
        let mut t = Table::new(&["ID", "AGENT", "STATE"]);
        let long = "a-very/long/group/with/many/levels/of/subgroups/project:agent";
        t.row(vec!["1".into(), long.into(), "connected".into()]);
        t.row(vec!["12".into(), "g/p:a".into(), "offline".into()]);
        let lines = t.render_within(None);
        assert_eq!(
            lines[0],
            format!("ID  AGENT{}  STATE", " ".repeat(long.len() - 5))
        );
        assert_eq!(lines[1], format!("1   {long}  connected"));
        assert!(lines[2].starts_with("12  g/p:a "), "{}", lines[2]);
        let state_column = lines[0].find("STATE");
        assert_eq!(lines[2].find("offline"), state_column);
    }

    #[test]
    fn a_narrow_terminal_cuts_other_columns_first_never_the_identifying_one() {
        let mut t = Table::new(&["ID", "AGENT", "STATE", "POD"]);
        let agent = "group/with/a/long/path/project:agent";
        let pod = "gitlab-agent/agentk-7c9d8f6b5-abcde";
        t.row(vec![
            "1".into(),
            agent.into(),
            "connected".into(),
            pod.into(),
        ]);
        let natural = t.render_within(None);
        assert_eq!(
            t.render_within(Some(500)),
            natural,
            "nothing cut when it fits"
        );
        let fitted = t.render_within(Some(60));
        assert!(fitted.iter().all(|l| l.chars().count() <= 60), "{fitted:?}");
        assert!(fitted[1].contains(agent), "{fitted:?}");
        assert!(fitted[1].ends_with('…'), "{fitted:?}");
        // Too narrow even for the identifying column: cut columns stop at MIN_CUT, it stays.
        let tiny = t.render_within(Some(10));
        assert!(tiny[1].contains(agent), "{tiny:?}");
        assert!(tiny[1].contains("connect…"), "{tiny:?}");
    }

    #[test]
    fn only_a_broken_pipe_of_standard_output_counts_as_stdout_closed() {
        let cut = anyhow::Error::from(on_stdout(std::io::ErrorKind::BrokenPipe.into()))
            .context("printing the agents");
        assert!(is_stdout_closed(&cut));
        // The connection to kas or a tunnel breaking is a broken pipe too, but not ours to hide.
        let socket = anyhow::Error::from(std::io::Error::from(std::io::ErrorKind::BrokenPipe))
            .context("sending to kas");
        assert!(!is_stdout_closed(&socket));
        // Other errors of standard output stay themselves.
        let full = on_stdout(std::io::Error::from(std::io::ErrorKind::StorageFull));
        assert_eq!(full.kind(), std::io::ErrorKind::StorageFull);
        assert!(!is_stdout_closed(&full.into()));
    }

    #[test]
    fn json_is_the_older_flag_for_dash_o_json() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            f: FormatArgs,
        }
        let f = |args: &[&str]| Cli::try_parse_from(args).map(|c| c.f.format());
        assert_eq!(f(&["x"]).ok(), Some(OutputFormat::Table));
        assert_eq!(f(&["x", "--json"]).ok(), Some(OutputFormat::Json));
        assert_eq!(f(&["x", "-o", "yaml"]).ok(), Some(OutputFormat::Yaml));
        assert!(f(&["x", "-o", "xml"]).is_err());
    }
}
