//! The line protocol an `exec` command speaks on stdout, and bounded line reading: parsing is
//! pure so it can be tested without a process, and every buffer has a fixed ceiling so a
//! chatty or hostile command cannot grow the server's memory.

use std::collections::VecDeque;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

/// Marks a progress line: `@progress <percent> [message]` or `@progress <cur>/<total> [message]`.
pub(super) const PROGRESS_MARKER: &str = "@progress";
/// Marks the result line: `@result <json>`.
pub(super) const RESULT_MARKER: &str = "@result";

/// How much of one output line is kept in a tail (and of a progress message); longer lines
/// are cut at a character boundary and end with `…`.
pub(super) const TAIL_LINE_BYTES: usize = 4 * 1024;

/// What one stdout line means.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Line<'a> {
    /// `@progress 40 message`: percent done, clamped to 0..=100.
    Percent { percent: u8, message: &'a str },
    /// `@progress 3/10 message`: units done out of a total.
    Units {
        current: u64,
        total: u64,
        message: &'a str,
    },
    /// `@result <json>`: the JSON text, not yet parsed.
    Result(&'a str),
    /// Anything else, including a `@progress` line whose numbers do not parse: keeping it as
    /// output shows the command's author what went wrong.
    Output(&'a str),
}

/// Parses one stdout line, without its line ending.
pub(super) fn parse_line(line: &str) -> Line<'_> {
    if let Some(rest) = directive(line, PROGRESS_MARKER) {
        return parse_progress(rest).unwrap_or(Line::Output(line));
    }
    if let Some(rest) = directive(line, RESULT_MARKER) {
        return Line::Result(rest.trim());
    }
    Line::Output(line)
}

/// The text after `marker` when the line starts with it as a whole word (`@progressive` is
/// plain output).
fn directive<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    let rest = line.strip_prefix(marker)?;
    if rest.is_empty() || rest.starts_with(char::is_whitespace) {
        Some(rest)
    } else {
        None
    }
}

fn parse_progress(rest: &str) -> Option<Line<'_>> {
    let rest = rest.trim_start();
    let (amount, message) = rest
        .split_once(char::is_whitespace)
        .map_or((rest, ""), |(amount, message)| (amount, message.trim()));
    if let Some((current, total)) = amount.split_once('/') {
        return Some(Line::Units {
            current: current.parse().ok()?,
            total: total.parse().ok()?,
            message,
        });
    }
    // Fractions are allowed ("12.5") because scripts often compute them; they are floored.
    let percent: f64 = amount.parse().ok()?;
    if !percent.is_finite() {
        return None;
    }
    Some(Line::Percent {
        percent: percent.clamp(0.0, 100.0) as u8,
        message,
    })
}

pub(super) use crate::job::truncate;

/// The last few lines of a stream, each cut to [`TAIL_LINE_BYTES`].
#[derive(Debug, Clone)]
pub(super) struct Tail {
    lines: VecDeque<String>,
    capacity: usize,
}

impl Tail {
    /// An empty tail keeping at most `capacity` lines.
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            lines: VecDeque::with_capacity(capacity),
            capacity,
        }
    }

    /// Adds a line, forgetting the oldest when full.
    pub(super) fn push(&mut self, line: &str) {
        if self.capacity == 0 {
            return;
        }
        if self.lines.len() == self.capacity {
            self.lines.pop_front();
        }
        self.lines.push_back(truncate(line, TAIL_LINE_BYTES));
    }

    /// The newest line.
    pub(super) fn last(&self) -> Option<&str> {
        self.lines.back().map(String::as_str)
    }

    /// The kept lines, oldest first.
    pub(super) fn to_vec(&self) -> Vec<String> {
        self.lines.iter().cloned().collect()
    }
}

/// One line as read: lossily decoded, line ending removed, and whether it was longer than
/// the reader's limit (then only its start is here).
pub(super) struct RawLine {
    pub(super) text: String,
    pub(super) truncated: bool,
}

/// Reads `stream` line by line, calling `on_line` for each, keeping at most `max_line` bytes of
/// any line (the rest up to its newline is skipped, so a command that never prints a newline
/// costs bounded memory). Returns at end of stream; a read error ends the stream too, and is
/// returned for logging. Dropping the future loses at most the line being read.
pub(super) async fn read_lines<R: AsyncRead + Unpin>(
    stream: R,
    max_line: usize,
    mut on_line: impl FnMut(RawLine),
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    let mut truncated = false;
    let mut emit = |line: &mut Vec<u8>, truncated: &mut bool| {
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        on_line(RawLine {
            text: String::from_utf8_lossy(line).into_owned(),
            truncated: *truncated,
        });
        line.clear();
        *truncated = false;
    };
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            if !line.is_empty() || truncated {
                emit(&mut line, &mut truncated);
            }
            return Ok(());
        }
        let newline = buf.iter().position(|&b| b == b'\n');
        let chunk = &buf[..newline.unwrap_or(buf.len())];
        let room = max_line.saturating_sub(line.len());
        if chunk.len() > room {
            truncated = true;
        }
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let consumed = newline.map_or(buf.len(), |i| i + 1);
        reader.consume(consumed);
        if newline.is_some() {
            emit(&mut line, &mut truncated);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_lines_are_parsed_and_clamped() {
        assert_eq!(
            parse_line("@progress 40 copying files"),
            Line::Percent {
                percent: 40,
                message: "copying files"
            }
        );
        assert_eq!(
            parse_line("@progress 250"),
            Line::Percent {
                percent: 100,
                message: ""
            }
        );
        assert_eq!(
            parse_line("@progress -3 x"),
            Line::Percent {
                percent: 0,
                message: "x"
            }
        );
        assert_eq!(
            parse_line("@progress 12.9"),
            Line::Percent {
                percent: 12,
                message: ""
            }
        );
    }

    #[test]
    fn unit_lines_are_parsed() {
        assert_eq!(
            parse_line("@progress 3/10   step 3  "),
            Line::Units {
                current: 3,
                total: 10,
                message: "step 3"
            }
        );
    }

    #[test]
    fn malformed_and_lookalike_directives_are_output() {
        for line in [
            "@progress",
            "@progress abc",
            "@progress 1/x",
            "@progress NaN",
            "@progressive 5",
            " @progress 5",
            "@resultant",
        ] {
            assert_eq!(parse_line(line), Line::Output(line), "{line:?}");
        }
    }

    #[test]
    fn result_lines_carry_their_json_text() {
        assert_eq!(parse_line("@result {\"a\":1} "), Line::Result("{\"a\":1}"));
        assert_eq!(parse_line("@result"), Line::Result(""));
    }

    #[test]
    fn tail_keeps_the_newest_lines_each_cut() {
        let mut tail = Tail::new(2);
        for line in ["a", "b", "c"] {
            tail.push(line);
        }
        assert_eq!(tail.to_vec(), ["b", "c"]);
        tail.push(&"é".repeat(TAIL_LINE_BYTES));
        let last = tail.last().unwrap_or_default();
        assert!(last.len() <= TAIL_LINE_BYTES + '…'.len_utf8());
        assert!(last.ends_with('…'));
    }

    #[tokio::test]
    async fn long_lines_are_cut_and_the_rest_skipped() {
        let input: &[u8] = b"0123456789\nab\r\nlast-without-newline";
        let mut lines = Vec::new();
        read_lines(input, 4, |line| lines.push((line.text, line.truncated)))
            .await
            .unwrap();
        assert_eq!(
            lines,
            [
                ("0123".to_owned(), true),
                ("ab".to_owned(), false),
                ("last".to_owned(), true)
            ]
        );
    }
}
