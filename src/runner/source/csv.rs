//! The CSV reader: a header row naming the fields, then one record per row (every value a
//! string), each with the line on which it starts.

use std::io::{self, BufRead, BufReader, Read};

use serde_json::{Map, Value};
use tokio::sync::mpsc;

use super::{Error, Input, Item, MAX_LINE_BYTES, READ_BUFFER, Ready, SourceRecord, bad, read_failure, send};

/// The body of the reader thread: the header row first (reported on `ready`), then one item
/// per record.
pub(super) fn read(reader: Box<dyn Read>, input: &Input, ready: Ready, sender: &mpsc::Sender<Item>) {
    let mut csv = csv::ReaderBuilder::new()
        // Rows of the wrong length are checked here, to report them as bad records.
        .flexible(true)
        .buffer_capacity(READ_BUFFER)
        .from_reader(LineFeeder::new(reader));
    let header = match csv_header(&mut csv, input) {
        Ok(header) => header,
        Err(error) => {
            let _ = ready.send(Err(error));
            return;
        }
    };
    if ready.send(Ok(())).is_err() {
        return;
    }
    let mut row = csv::ByteRecord::new();
    loop {
        csv.get_mut().start_record();
        let result = csv.read_byte_record(&mut row);
        let line = csv.get_ref().record_line();
        let item = match result {
            Ok(false) => break,
            Ok(true) => csv_item(&header, &row, line),
            Err(error) => {
                send(sender, read_failure(line, error));
                return;
            }
        };
        if !send(sender, item) {
            return;
        }
    }
    tracing::debug!(lines = csv.get_ref().lines, "CSV source read to its end");
}

/// Hands the CSV parser at most one line per `read`, and so knows the line on which each
/// record starts. The csv crate's own positions cannot be used: they are one line early for
/// every record of a CRLF file, and point at the blank lines before a record.
///
/// It also bounds a record to [`MAX_LINE_BYTES`]: a quote left open would otherwise make the
/// parser swallow the rest of the file into one record, however large.
struct LineFeeder {
    inner: BufReader<Box<dyn Read>>,
    /// Complete lines handed to the parser so far.
    lines: u64,
    /// The line of the first non-blank bytes handed out since [`LineFeeder::start_record`].
    record_start: Option<u64>,
    /// Bytes handed out since [`LineFeeder::start_record`].
    record_bytes: usize,
}

impl LineFeeder {
    fn new(reader: Box<dyn Read>) -> Self {
        Self { inner: BufReader::with_capacity(READ_BUFFER, reader), lines: 0, record_start: None, record_bytes: 0 }
    }

    /// Called before the parser reads a record.
    fn start_record(&mut self) {
        self.record_start = None;
        self.record_bytes = 0;
    }

    /// The line on which the record just read starts.
    fn record_line(&self) -> u64 {
        self.record_start.unwrap_or(self.lines + 1)
    }
}

impl Read for LineFeeder {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let available = self.inner.fill_buf()?;
        let line_end = available.iter().position(|&b| b == b'\n').map_or(available.len(), |newline| newline + 1);
        let n = line_end.min(buf.len());
        let chunk = &available[..n];
        buf[..n].copy_from_slice(chunk);
        // The parser skips empty lines (CRLF, LF or CR alone); a record starts after them.
        if self.record_start.is_none() && !chunk.iter().all(|&b| b == b'\r' || b == b'\n') {
            self.record_start = Some(self.lines + 1);
        }
        self.lines += u64::from(chunk.ends_with(b"\n"));
        self.record_bytes += n;
        self.inner.consume(n);
        if self.record_bytes > MAX_LINE_BYTES {
            return Err(io::Error::other("CSV record longer than 16 MiB (is a quote left open?)"));
        }
        Ok(n)
    }
}

/// The field names, in column order; `None` for a column with an empty name (ignored).
type Header = Vec<Option<String>>;

fn csv_header(csv: &mut csv::Reader<LineFeeder>, input: &Input) -> Result<Header, Error> {
    let header_error = |reason: String| Error::CsvHeader { input: input.to_string(), reason };
    let names = csv.byte_headers().map_err(|error| match error.into_kind() {
        csv::ErrorKind::Io(source) => Error::Read { input: input.to_string(), source },
        other => header_error(format!("cannot read the header row: {other:?}")),
    })?;
    if names.is_empty() {
        return Err(header_error("it is empty, but a CSV source needs a header row naming its fields".to_owned()));
    }
    let mut header = Header::with_capacity(names.len());
    for (index, name) in names.iter().enumerate() {
        let name = std::str::from_utf8(name)
            .map_err(|_| header_error(format!("the header of column {} is not valid UTF-8", index + 1)))?;
        if !name.is_empty() && header.iter().flatten().any(|seen| seen == name) {
            return Err(header_error(format!("the header row names column \"{name}\" twice")));
        }
        header.push((!name.is_empty()).then(|| name.to_owned()));
    }
    Ok(header)
}

fn csv_item(header: &Header, row: &csv::ByteRecord, line: u64) -> Item {
    if row.len() != header.len() {
        return Err(bad(line, format!("CSV row has {} fields, header has {}", row.len(), header.len())));
    }
    let mut fields = Map::new();
    for (name, value) in header.iter().zip(row) {
        let Some(name) = name else { continue };
        match std::str::from_utf8(value) {
            Ok(value) => fields.insert(name.clone(), Value::String(value.to_owned())),
            Err(_) => return Err(bad(line, format!("field \"{name}\" is not valid UTF-8"))),
        };
    }
    Ok(SourceRecord { line, fields })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::testing::{bad_record, csv, file_with, read_all, record};
    use super::super::{Error, MAX_LINE_BYTES, open};

    #[tokio::test]
    async fn csv_values_are_strings_with_quoted_fields_and_the_start_line_of_each_row() {
        let file = file_with(
            b"\xEF\xBB\xBFid,name,note\n\
              1,\"Smith, Jane\",\"two\nlines\"\n\
              2,Bob\n\
              \n\
              3,\"He said \"\"hi\"\"\",\n\
              4,a,b,c\n\
              5,\xFF,x\n\
              6,last,row",
        );
        let items = read_all(&csv(&file)).await;
        assert_eq!(
            items,
            vec![
                record(2, json!({"id": "1", "name": "Smith, Jane", "note": "two\nlines"})),
                bad_record(4, "CSV row has 2 fields, header has 3"),
                record(6, json!({"id": "3", "name": "He said \"hi\"", "note": ""})),
                bad_record(7, "CSV row has 4 fields, header has 3"),
                bad_record(8, "field \"name\" is not valid UTF-8"),
                record(9, json!({"id": "6", "name": "last", "note": "row"})),
            ]
        );
    }

    #[tokio::test]
    async fn csv_line_numbers_hold_for_crlf_files_and_blank_lines() {
        let file = file_with(b"id,name\r\n1,a\r\n\r\n\r\n2,\"b\r\nc\"\r\n3\r\n4,d");
        assert_eq!(
            read_all(&csv(&file)).await,
            vec![
                record(2, json!({"id": "1", "name": "a"})),
                record(5, json!({"id": "2", "name": "b\r\nc"})),
                bad_record(7, "CSV row has 1 fields, header has 2"),
                record(8, json!({"id": "4", "name": "d"})),
            ]
        );
    }

    #[tokio::test]
    async fn csv_quote_left_open_ends_the_stream_instead_of_filling_memory() {
        let mut contents = b"id,note\n1,ok\n2,\"open quote\n".to_vec();
        for n in 0..(MAX_LINE_BYTES / 16 + 1) {
            contents.extend_from_slice(format!("{n:>7},padding\n").as_bytes());
        }
        let items = read_all(&csv(&file_with(&contents))).await;
        assert_eq!(items.len(), 2, "{:?}", &items[1..].iter().map(|i| i.as_ref().err()).collect::<Vec<_>>());
        assert_eq!(items[0], record(2, json!({"id": "1", "note": "ok"})));
        let last = items[1].as_ref().unwrap_err();
        assert_eq!(last.line, 3);
        assert!(last.message.contains("longer than 16 MiB (is a quote left open?)"), "{}", last.message);
        assert!(last.message.contains("the rest of the source was not read"), "{}", last.message);
    }

    #[tokio::test]
    async fn csv_columns_without_a_name_are_ignored() {
        let file = file_with(b"id,,name,\n1,x,Ada,\n");
        assert_eq!(read_all(&csv(&file)).await, vec![record(2, json!({"id": "1", "name": "Ada"}))]);
    }

    #[tokio::test]
    async fn csv_without_a_usable_header_cannot_be_opened() {
        let empty = file_with(b"");
        let error = open(&csv(&empty)).await.unwrap_err();
        assert!(matches!(error, Error::CsvHeader { .. }), "{error:?}");
        assert!(error.to_string().contains("needs a header row"), "{error}");

        let twice = file_with(b"id,name,id\n1,a,2\n");
        let error = open(&csv(&twice)).await.unwrap_err().to_string();
        assert!(error.contains("names column \"id\" twice"), "{error}");
        assert!(error.contains(&twice.path().display().to_string()), "{error}");
    }
}
