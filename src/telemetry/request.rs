//! Which request a log line belongs to, without a span per request.
//!
//! The edge sets the request's tag in a thread-local while it polls the
//! request (and while it admits it); [`WithRequest`] appends the tag to
//! every line logged meanwhile on that thread. A `tracing` span did the
//! same for ~2.5 µs of CPU per request (made, entered and closed through
//! the registry and the filter, its fields formatted up front: ~5 µs per
//! packet with unary marks, BENCHMARKS.md); this costs a reference count
//! per poll, and formatting only when a line is written.
//!
//! Invariant: the tag is set only for the length of an [`Entered`] guard,
//! and the guard puts back what was set before it (a request polled
//! inside another's poll keeps its own tag, then the outer one's).
use std::cell::RefCell;
use std::fmt;
use std::sync::Arc;

use axum::http::HeaderValue;
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// What a request's log lines carry.
#[derive(Debug)]
pub struct Tag {
    /// The request's id (visible ASCII, at most 128 characters).
    pub id: HeaderValue,
    /// The method's label (`request_id::Method::label`).
    pub method: &'static str,
}

thread_local! {
    static CURRENT: RefCell<Option<Arc<Tag>>> = const { RefCell::new(None) };
}

/// While it lives, lines logged on this thread carry `tag`.
#[must_use = "the tag is set only while the guard lives"]
pub struct Entered {
    before: Option<Arc<Tag>>,
}

pub fn enter(tag: &Arc<Tag>) -> Entered {
    let before = CURRENT.with(|current| current.replace(Some(tag.clone())));
    Entered { before }
}

impl Drop for Entered {
    fn drop(&mut self) {
        let ours = CURRENT.with(|current| current.replace(self.before.take()));
        drop(ours);
    }
}

fn current() -> Option<Arc<Tag>> {
    CURRENT.with(|current| current.borrow().clone())
}

/// A log format that appends the current request's tag to the line
/// `inner` writes: ` request_id=… method=…` in text, two more top-level
/// keys in JSON.
pub struct WithRequest<F> {
    inner: F,
    json: bool,
}

impl<F> WithRequest<F> {
    pub fn text(inner: F) -> Self {
        WithRequest { inner, json: false }
    }

    pub fn json(inner: F) -> Self {
        WithRequest { inner, json: true }
    }
}

impl<S, N, F> FormatEvent<S, N> for WithRequest<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let Some(tag) = current() else {
            return self.inner.format_event(ctx, writer, event);
        };
        // `inner` ends its line; the tag goes before that end. (`inner`
        // decides colours itself: `Writer::new` has none.)
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        let line = line.strip_suffix('\n').unwrap_or(&line);
        let id = tag.id.to_str().unwrap_or_default();
        if self.json {
            let Some(object) = line.strip_suffix('}') else {
                return writeln!(writer, "{line}");
            };
            let id = serde_json::to_string(id).map_err(|_| fmt::Error)?;
            writeln!(
                writer,
                "{object},\"request_id\":{id},\"method\":\"{}\"}}",
                tag.method
            )
        } else {
            writeln!(writer, "{line} request_id={id} method={}", tag.method)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tracing_subscriber::fmt::MakeWriter;
    use tracing_subscriber::fmt::format::{Format, JsonFields};

    use super::*;

    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Lines {
        type Writer = Lines;
        fn make_writer(&'a self) -> Lines {
            self.clone()
        }
    }

    impl Lines {
        fn text(&self) -> Vec<String> {
            let bytes = self.0.lock().unwrap().clone();
            String::from_utf8(bytes)
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect()
        }
    }

    fn tag(id: &str, method: &'static str) -> Arc<Tag> {
        Arc::new(Tag {
            id: HeaderValue::from_str(id).unwrap(),
            method,
        })
    }

    /// Logs a line outside any request, one inside `a`, one inside `b`
    /// entered within `a`, and one after `b` ends, still inside `a`.
    fn log_nested() {
        tracing::info!(n = 1, "before");
        let a = tag("id-a", "Ingest");
        let _in_a = enter(&a);
        tracing::info!(n = 2, "in a");
        {
            let _in_b = enter(&tag("say \"b\"", "Status"));
            tracing::warn!(n = 3, "in b");
        }
        tracing::info!(n = 4, "a again");
    }

    #[test]
    fn text_lines_carry_the_request_they_were_logged_in() {
        let lines = Lines::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(lines.clone())
            .event_format(WithRequest::text(Format::default().with_ansi(false)))
            .finish();
        tracing::subscriber::with_default(subscriber, log_nested);
        let text = lines.text();
        assert_eq!(text.len(), 4, "{text:?}");
        assert!(text[0].ends_with("before n=1"), "{}", text[0]);
        assert!(
            text[1].ends_with("in a n=2 request_id=id-a method=Ingest"),
            "{}",
            text[1]
        );
        assert!(
            text[2].ends_with("in b n=3 request_id=say \"b\" method=Status"),
            "{}",
            text[2]
        );
        assert!(
            text[3].ends_with("a again n=4 request_id=id-a method=Ingest"),
            "{}",
            text[3]
        );
    }

    #[test]
    fn json_lines_carry_the_request_as_two_more_keys() {
        let lines = Lines::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(lines.clone())
            .fmt_fields(JsonFields::new())
            .event_format(WithRequest::json(Format::default().json()))
            .finish();
        tracing::subscriber::with_default(subscriber, log_nested);
        let parsed: Vec<serde_json::Value> = lines
            .text()
            .iter()
            .map(|line| serde_json::from_str(line).expect("each line is one JSON object"))
            .collect();
        let seen: Vec<_> = parsed
            .iter()
            .map(|line| {
                (
                    line["fields"]["n"].as_i64().unwrap(),
                    line.get("request_id").and_then(|v| v.as_str()),
                    line.get("method").and_then(|v| v.as_str()),
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                (1, None, None),
                (2, Some("id-a"), Some("Ingest")),
                (3, Some("say \"b\""), Some("Status")),
                (4, Some("id-a"), Some("Ingest")),
            ]
        );
    }
}
