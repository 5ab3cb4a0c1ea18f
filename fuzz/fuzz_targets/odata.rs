//! OData Repeatable Requests (`layer::odata::parse`): the `Repeatability-First-Sent`
//! HTTP date in its three formats (IMF-fixdate, RFC 850, asctime), the retention window,
//! the pairing of the headers and the `Repeatability-Client-ID` check.

#![no_main]

use std::time::{Duration, UNIX_EPOCH};

use http::StatusCode;
use http::header::{HeaderMap, HeaderValue};
use idem::core::key;
use idem::layer::odata::{self, CLIENT_ID, FIRST_SENT, REQUEST_ID};
use idem_fuzz::Message;
use libfuzzer_sys::fuzz_target;

/// Seconds from 1970 to the end of 9999, the range of HTTP dates.
const LAST_HTTP_DATE: u64 = 253_402_300_799;

fuzz_target!(|data: &[u8]| {
    // Header lines only: `id`, `sent`, `client` are the three headers as sent; `gen: FORMAT
    // SECONDS` writes `sent` in imf, rfc850 or asctime; `now` and `retention` are seconds;
    // `edge: 0|1` puts `now` exactly on, or one second past, the end of the window.
    let mut framed = b"odata\n".to_vec();
    framed.extend_from_slice(data);
    let input = Message::parse(&framed);
    let number = |name: &str| input.text(name).and_then(|t| t.trim().parse::<u64>().ok());
    let retention = Duration::from_secs(number("retention").unwrap_or(86_400) % (1 << 32));
    let (text, generated) = match input.text("gen").as_deref().and_then(|g| g.split_once(' ')) {
        Some((format, t)) => {
            let t = t.trim().parse::<u64>().unwrap_or(0);
            match format {
                // RFC 850 has two-digit years: 1970–2069 are the ones it can name.
                "rfc850" => formatted(t, rfc850, 2069),
                "asctime" => formatted(t, asctime, 9999),
                _ => formatted(t, imf, 9999),
            }
        }
        None => (input.all("sent").next().map(<[u8]>::to_vec), None),
    };
    let mut headers = HeaderMap::new();
    let mut put = |name, value: Option<&[u8]>| {
        let value = value.and_then(|v| HeaderValue::from_bytes(v).ok())?;
        headers.insert(name, value.clone());
        Some(value)
    };
    let id = put(REQUEST_ID, input.all("id").next());
    let sent = put(FIRST_SENT, text.as_deref());
    let client = put(CLIENT_ID, input.all("client").next());

    // A date the fuzzer built in one of the three formats parses back to its second.
    let parsed = sent.as_ref().and_then(|v| httpdate::parse_http_date(v.to_str().ok()?).ok());
    if let Some(t) = generated {
        assert_eq!(parsed, Some(UNIX_EPOCH + Duration::from_secs(t)), "{:?}", String::from_utf8_lossy(&text.unwrap()));
    }
    // Any date that parses formats (IMF-fixdate) and parses back to the same instant.
    if let Some(p) = parsed {
        assert_eq!(httpdate::parse_http_date(&httpdate::fmt_http_date(p)).ok(), Some(p));
    }

    let on_the_edge = number("edge").map(|e| e % 2);
    let now = match (on_the_edge, parsed) {
        (Some(past), Some(p)) => p + retention + Duration::from_secs(past),
        _ => UNIX_EPOCH + Duration::from_secs(number("now").unwrap_or(1_700_000_000) % (LAST_HTTP_DATE + 1)),
    };
    assert_eq!(odata::present(&headers), id.is_some() || sent.is_some() || client.is_some());
    let verdict = odata::parse(&headers, now, retention);
    let status = verdict.as_ref().err().map(|problem| problem.status());
    match (&id, &sent) {
        (None, None) if client.is_none() => assert_eq!(verdict, Ok(None)),
        (Some(id), Some(_)) => match parsed {
            None => assert_eq!(status, Some(StatusCode::BAD_REQUEST), "an unparseable date is 400"),
            Some(p) if now.duration_since(p).is_ok_and(|age| age > retention) => {
                assert_eq!(status, Some(StatusCode::PRECONDITION_FAILED), "a stale date is 412")
            }
            Some(_) => match client.as_ref().map(|c| key::validate(c.as_bytes())) {
                Some(Err(_)) => assert_eq!(status, Some(StatusCode::BAD_REQUEST), "a bad client id is 400"),
                valid => {
                    let r = verdict
                        .clone()
                        .expect("a fresh, well-formed repeatable request is accepted")
                        .expect("it is one");
                    assert_eq!(r.request_id, id.as_bytes(), "the request id is kept as sent");
                    assert_eq!(r.client_id.as_deref(), valid.map(|v| v.unwrap()));
                }
            },
        },
        _ => assert_eq!(status, Some(StatusCode::BAD_REQUEST), "half a pair is 400"),
    }
    let client_ok = client.as_ref().is_none_or(|c| key::validate(c.as_bytes()).is_ok());
    if on_the_edge == Some(0) && id.is_some() && parsed.is_some() && client_ok {
        assert!(verdict.is_ok(), "a date exactly as old as the retention window is accepted");
    }
});

/// The text of second `t` (within the range of HTTP dates) in one format, and the second
/// it must parse back to when the format can name its year.
fn formatted(t: u64, format: fn(Civil) -> String, last_year: u64) -> (Option<Vec<u8>>, Option<u64>) {
    let t = t % (LAST_HTTP_DATE + 1);
    let civil = Civil::of(t);
    (Some(format(civil).into_bytes()), (civil.year <= last_year).then_some(t))
}

const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
const LONG_DAYS: [&str; 7] = ["Thursday", "Friday", "Saturday", "Sunday", "Monday", "Tuesday", "Wednesday"];
const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];

#[derive(Clone, Copy)]
struct Civil {
    year: u64,
    month: usize,
    day: u64,
    weekday: usize,
    hour: u64,
    minute: u64,
    second: u64,
}

impl Civil {
    /// Howard Hinnant's days-to-civil, for days since 1970-01-01 (a Thursday).
    fn of(t: u64) -> Civil {
        let days = t / 86_400;
        let z = days + 719_468;
        let era = z / 146_097;
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as usize;
        let year = yoe + era * 400 + u64::from(month <= 2);
        let s = t % 86_400;
        Civil { year, month, day, weekday: (days % 7) as usize, hour: s / 3600, minute: s / 60 % 60, second: s % 60 }
    }
}

/// `Sun, 06 Nov 1994 08:49:37 GMT`
fn imf(c: Civil) -> String {
    let Civil { year, month, day, weekday, hour, minute, second } = c;
    format!("{}, {day:02} {} {year:04} {hour:02}:{minute:02}:{second:02} GMT", DAYS[weekday], MONTHS[month - 1])
}

/// `Sunday, 06-Nov-94 08:49:37 GMT`
fn rfc850(c: Civil) -> String {
    let Civil { year, month, day, weekday, hour, minute, second } = c;
    let yy = year % 100;
    format!("{}, {day:02}-{}-{yy:02} {hour:02}:{minute:02}:{second:02} GMT", LONG_DAYS[weekday], MONTHS[month - 1])
}

/// `Sun Nov  6 08:49:37 1994`
fn asctime(c: Civil) -> String {
    let Civil { year, month, day, weekday, hour, minute, second } = c;
    format!("{} {} {day:>2} {hour:02}:{minute:02}:{second:02} {year:04}", DAYS[weekday], MONTHS[month - 1])
}
