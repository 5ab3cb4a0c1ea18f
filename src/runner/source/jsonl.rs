//! The JSON Lines reader: one JSON object per line, blank lines skipped, a byte order mark on
//! the first line ignored, a line longer than [`MAX_LINE_BYTES`] reported and skipped.

use std::io::{self, BufRead, BufReader, Read};

use serde_json::Value;
use tokio::sync::mpsc;

use super::{Input, Item, MAX_LINE_BYTES, READ_BUFFER, Ready, SourceRecord, bad, json_kind, read_failure, send};

/// The body of the reader thread: one item per non-blank line.
pub(super) fn read(reader: Box<dyn Read>, _input: &Input, ready: Ready, sender: &mpsc::Sender<Item>) {
    if ready.send(Ok(())).is_err() {
        return;
    }
    let mut reader = BufReader::with_capacity(READ_BUFFER, reader);
    let mut line = Vec::new();
    let mut number = 0;
    loop {
        number += 1;
        line.clear();
        let item = match read_line(&mut reader, &mut line) {
            Ok(Line::End) => break,
            Ok(Line::TooLong) => Some(Err(bad(number, "line longer than 16 MiB"))),
            Ok(Line::Complete) => parse_jsonl_line(number, &line),
            Err(error) => {
                send(sender, read_failure(number, error));
                return;
            }
        };
        let go_on = match item {
            Some(item) => send(sender, item),
            None => !sender.is_closed(),
        };
        if !go_on {
            return;
        }
        // One huge line must not pin its buffer for the rest of the file.
        if line.capacity() > READ_BUFFER {
            line = Vec::new();
        }
    }
    tracing::debug!(lines = number - 1, "JSON Lines source read to its end");
}

enum Line {
    Complete,
    TooLong,
    End,
}

/// Reads one line into `line`, at most [`MAX_LINE_BYTES`] of it; a longer line is skipped
/// up to and including its newline.
fn read_line(reader: &mut impl BufRead, line: &mut Vec<u8>) -> io::Result<Line> {
    let limit = MAX_LINE_BYTES as u64 + 1;
    let read = reader.take(limit).read_until(b'\n', line)?;
    if read == 0 {
        return Ok(Line::End);
    }
    let content = line.len() - usize::from(line.ends_with(b"\n"));
    if content > MAX_LINE_BYTES {
        reader.skip_until(b'\n')?;
        return Ok(Line::TooLong);
    }
    Ok(Line::Complete)
}

/// The item for one line, or `None` for a blank line.
fn parse_jsonl_line(number: u64, line: &[u8]) -> Option<Item> {
    let mut text = line.strip_suffix(b"\n").unwrap_or(line);
    text = text.strip_suffix(b"\r").unwrap_or(text);
    if number == 1 {
        text = text.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(text);
    }
    if text.iter().all(u8::is_ascii_whitespace) {
        return None;
    }
    Some(match serde_json::from_slice::<Value>(text) {
        Ok(Value::Object(fields)) => Ok(SourceRecord { line: number, fields }),
        Ok(other) => Err(bad(number, format!("not a JSON object (found {})", json_kind(&other)))),
        Err(error) => Err(bad(number, json_error(&error))),
    })
}

/// "invalid JSON at column 17: expected `,` or `}`". serde_json's messages describe the
/// syntax and never quote the input.
fn json_error(error: &serde_json::Error) -> String {
    let full = error.to_string();
    let suffix = format!(" at line {} column {}", error.line(), error.column());
    let what = full.strip_suffix(&suffix).unwrap_or(&full);
    format!("invalid JSON at column {}: {what}", error.column())
}

#[cfg(test)]
mod tests {
    use std::io::{self, Write};
    use std::time::Instant;

    use serde_json::json;

    use super::super::open;
    use super::super::testing::{bad_record, file_with, jsonl, read_all, record};
    use super::*;

    #[tokio::test]
    async fn jsonl_yields_objects_with_line_numbers_and_reports_bad_lines() {
        let file = file_with(
            b"\xEF\xBB\xBF{\"order_id\": 1, \"name\": \"Ada\"}\n\
              \n\
              {\"order_id\": 2,, \"name\": \"secret\"}\n\
              [1, 2]\n\
              \"just a string\"\n   \t\n\
              {\"order_id\": 3, \"nested\": {\"a\": [true, null]}}\r\n\
              {\"order_id\": 4}",
        );
        let items = read_all(&jsonl(&file)).await;
        assert_eq!(
            items,
            vec![
                record(1, json!({"order_id": 1, "name": "Ada"})),
                bad_record(3, "invalid JSON at column 16: key must be a string"),
                bad_record(4, "not a JSON object (found an array)"),
                bad_record(5, "not a JSON object (found a string)"),
                record(7, json!({"order_id": 3, "nested": {"a": [true, null]}})),
                record(8, json!({"order_id": 4})),
            ]
        );
        let bad_count = items.iter().filter(|item| item.is_err()).count();
        assert_eq!(bad_count, 3);
        assert!(items.iter().all(|item| item.as_ref().err().is_none_or(|bad| !bad.message.contains("secret"))));
    }

    #[tokio::test]
    async fn jsonl_truncated_line_and_empty_file() {
        let file = file_with(b"{\"a\": 1\n{\"b\": \"x\n");
        let items = read_all(&jsonl(&file)).await;
        assert_eq!(
            items,
            vec![
                bad_record(1, "invalid JSON at column 7: EOF while parsing an object"),
                bad_record(2, "invalid JSON at column 8: EOF while parsing a string"),
            ]
        );
        assert_eq!(read_all(&jsonl(&file_with(b""))).await, vec![]);
    }

    #[tokio::test]
    async fn jsonl_line_over_the_cap_is_reported_and_reading_resumes_after_it() {
        let mut contents = b"{\"n\": 1}\n{\"long\": \"".to_vec();
        contents.resize(contents.len() + MAX_LINE_BYTES, b'x');
        contents.extend_from_slice(b"\"}\n{\"n\": 3}\n");
        let file = file_with(&contents);
        let items = read_all(&jsonl(&file)).await;
        assert_eq!(
            items,
            vec![record(1, json!({"n": 1})), bad_record(2, "line longer than 16 MiB"), record(3, json!({"n": 3})),]
        );
    }

    #[tokio::test]
    async fn jsonl_line_exactly_at_the_cap_is_read() {
        let mut contents = b"{\"long\": \"".to_vec();
        contents.resize(MAX_LINE_BYTES - 2, b'x');
        contents.extend_from_slice(b"\"}\n{\"n\": 2}");
        let items = read_all(&jsonl(&file_with(&contents))).await;
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].as_ref().unwrap().fields["long"].as_str().unwrap().len(), MAX_LINE_BYTES - 2 - 10);
        assert_eq!(items[1], record(2, json!({"n": 2})));
    }

    /// Reads a generated file end to end through the channel and prints the rate (not asserted:
    /// speed is for benchmarks, this checks that nothing is lost or buffered whole).
    #[tokio::test]
    async fn a_large_jsonl_file_streams_end_to_end() {
        const LINES: u64 = 300_000;
        let mut file = tempfile::NamedTempFile::new().unwrap();
        {
            let mut writer = io::BufWriter::new(file.as_file_mut());
            for n in 1..=LINES {
                writeln!(writer, "{{\"order_id\":{n},\"amount\":\"12.50\",\"email\":\"c{n}@example.com\"}}").unwrap();
            }
        }
        let bytes = file.as_file().metadata().unwrap().len();
        let started = Instant::now();
        let mut records = open(&jsonl(&file)).await.unwrap();
        let (mut count, mut last_line) = (0u64, 0);
        while let Some(item) = records.recv().await {
            let record = item.unwrap();
            assert_eq!(record.line, last_line + 1);
            last_line = record.line;
            count += 1;
        }
        let elapsed = started.elapsed();
        assert_eq!(count, LINES);
        println!(
            "read {count} records ({} MiB) in {elapsed:.2?}: {:.0} records/s",
            bytes >> 20,
            count as f64 / elapsed.as_secs_f64()
        );
    }
}
