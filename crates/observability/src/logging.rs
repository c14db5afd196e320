//! A `tracing` layer writing JSON lines (or human-readable text) and a reloadable level filter.

use std::io::Write;
use std::sync::Mutex;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, reload};

/// Name of the field whose JSON object value is spread into the log line.
pub const FIELDS_JSON: &str = "fields_json";

/// How log lines look.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line (`level`, `time`, `msg` first): for log collectors.
    #[default]
    Json,
    /// `TIME LEVEL msg key=value ...`: for people reading a terminal during local runs.
    Text,
}

/// A format name was not `json` or `text`.
#[derive(Debug, thiserror::Error)]
#[error("unknown log format {0:?} (expected json or text)")]
pub struct BadFormat(pub String);

impl std::str::FromStr for LogFormat {
    type Err = BadFormat;

    fn from_str(s: &str) -> Result<Self, BadFormat> {
        match s.trim().to_ascii_lowercase().as_str() {
            "json" => Ok(LogFormat::Json),
            "text" => Ok(LogFormat::Text),
            _ => Err(BadFormat(s.to_string())),
        }
    }
}

impl std::fmt::Display for LogFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LogFormat::Json => "json",
            LogFormat::Text => "text",
        })
    }
}

/// Writes one line per event, as JSON or as text.
pub struct JsonLayer<W: Write + Send + 'static> {
    out: Mutex<W>,
    format: LogFormat,
}

impl<W: Write + Send + 'static> std::fmt::Debug for JsonLayer<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsonLayer").finish_non_exhaustive()
    }
}

impl<W: Write + Send + 'static> JsonLayer<W> {
    /// JSON lines into `out`.
    pub fn new(out: W) -> Self {
        Self::with_format(out, LogFormat::Json)
    }

    pub fn with_format(out: W, format: LogFormat) -> Self {
        Self {
            out: Mutex::new(out),
            format,
        }
    }
}

struct Fields(Map<String, Value>);

struct SpanFields(Map<String, Value>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.insert(field, Value::String(format!("{value:?}")));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.insert(field, Value::String(value.to_string()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.insert(field, Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.insert(field, Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.insert(field, Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.insert(field, Value::from(value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.insert(field, Value::String(value.to_string()));
    }
}

impl Fields {
    fn insert(&mut self, field: &Field, value: Value) {
        let key = match field.name() {
            "message" => "msg",
            other => other,
        };
        self.0.insert(key.to_string(), value);
    }
}

/// One JSON object per line with `level`, `time` and `msg` first, as GitLab's agentk writes
/// them (users grep for `{"level":"info","time":…,"msg":…`), then the other fields by name.
fn json_line(mut obj: Map<String, Value>) -> String {
    let mut line = String::from("{");
    let leading: Vec<(String, Value)> = ["level", "time", "msg"]
        .into_iter()
        .filter_map(|k| obj.remove(k).map(|v| (k.to_string(), v)))
        .collect();
    for (i, (k, v)) in leading.into_iter().chain(obj).enumerate() {
        if i > 0 {
            line.push(',');
        }
        line.push_str(&Value::from(k).to_string());
        line.push(':');
        line.push_str(&v.to_string());
    }
    line.push_str("}\n");
    line
}

/// `2026-11-26T05:00:00Z INFO  Synchronizing objects agent_id=1 project=group/app`: time, level
/// (padded to five), message, then the other fields as `key=value`, values quoted when they hold
/// spaces, quotes or `=` (or are empty), so a line still splits unambiguously.
fn text_line(mut obj: Map<String, Value>) -> String {
    let field = |obj: &mut Map<String, Value>, k: &str| match obj.remove(k) {
        Some(Value::String(s)) => s,
        Some(other) => other.to_string(),
        None => String::new(),
    };
    let time = field(&mut obj, "time");
    let level = field(&mut obj, "level").to_ascii_uppercase();
    let msg = field(&mut obj, "msg");
    let mut line = format!("{time} {level:<5} {msg}");
    for (k, v) in obj {
        let text = match v {
            Value::String(s) => s,
            other => other.to_string(),
        };
        line.push(' ');
        line.push_str(&k);
        line.push('=');
        if text.is_empty() || text.contains([' ', '"', '=', '\n', '\t']) {
            line.push_str(&Value::from(text).to_string());
        } else {
            line.push_str(&text);
        }
    }
    line.push('\n');
    line
}

fn level_name(l: &Level) -> &'static str {
    match *l {
        Level::ERROR => "error",
        Level::WARN => "warn",
        Level::INFO => "info",
        Level::DEBUG => "debug",
        Level::TRACE => "trace",
    }
}

/// `tether_tunnel_agent::pool` → `tunnel_agent`: a readable module name when no span set one.
fn mod_from_target(target: &str) -> String {
    let first = target.split("::").next().unwrap_or(target);
    first.strip_prefix("tether_").unwrap_or(first).to_string()
}

impl<S, W> Layer<S> for JsonLayer<W>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: Write + Send + 'static,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut f = Fields(Map::new());
        attrs.record(&mut f);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(SpanFields(f.0));
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            let mut ext = span.extensions_mut();
            if let Some(SpanFields(map)) = ext.get_mut::<SpanFields>() {
                let mut f = Fields(std::mem::take(map));
                values.record(&mut f);
                *map = f.0;
            }
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let meta = event.metadata();
        let mut obj = Map::new();
        obj.insert("level".into(), Value::from(level_name(meta.level())));
        let now = time::OffsetDateTime::now_utc();
        let ts = now
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        obj.insert("time".into(), Value::from(ts));
        // Span fields first (outermost to innermost), so the event's own fields win.
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                if let Some(SpanFields(m)) = span.extensions().get::<SpanFields>() {
                    for (k, v) in m {
                        obj.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        let mut f = Fields(Map::new());
        event.record(&mut f);
        for (k, v) in f.0 {
            // A field holding a whole JSON object (structured events such as per-resource
            // GitOps events) is spread into the line, so consumers see flat keys.
            if k == FIELDS_JSON
                && let Value::String(text) = &v
                && let Ok(Value::Object(extra)) = serde_json::from_str::<Value>(text)
            {
                for (ek, ev) in extra {
                    obj.insert(ek, ev);
                }
                continue;
            }
            obj.insert(k, v);
        }
        if !obj.contains_key("mod_name") {
            obj.insert(
                "mod_name".into(),
                Value::from(mod_from_target(meta.target())),
            );
        }
        let line = match self.format {
            LogFormat::Json => json_line(obj),
            LogFormat::Text => text_line(obj),
        };
        let mut out = self
            .out
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = out.write_all(line.as_bytes());
        let _ = out.flush();
    }
}

/// Changes the log level of a running program.
#[derive(Clone)]
pub struct LogHandle {
    handle: reload::Handle<LevelFilter, tracing_subscriber::Registry>,
}

impl std::fmt::Debug for LogHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogHandle").finish_non_exhaustive()
    }
}

/// A level name was not one of error, warn, info, debug, trace.
#[derive(Debug, thiserror::Error)]
#[error("unknown log level {0:?} (expected error, warn, info, debug or trace)")]
pub struct BadLevel(pub String);

/// Parses `error`, `warn`, `info`, `debug`, `trace` (case-insensitive).
pub fn parse_level(s: &str) -> Result<LevelFilter, BadLevel> {
    match s.trim().to_ascii_lowercase().as_str() {
        "error" => Ok(LevelFilter::ERROR),
        "warn" | "warning" => Ok(LevelFilter::WARN),
        "info" => Ok(LevelFilter::INFO),
        "debug" => Ok(LevelFilter::DEBUG),
        "trace" => Ok(LevelFilter::TRACE),
        _ => Err(BadLevel(s.to_string())),
    }
}

impl LogHandle {
    pub fn set_level(&self, level: LevelFilter) {
        let _ = self.handle.modify(|f| *f = level);
    }
    pub fn level(&self) -> Option<LevelFilter> {
        self.handle.clone_current()
    }
}

/// Installs the JSON logger on stderr as the global subscriber.
pub fn init_logging(level: LevelFilter) -> LogHandle {
    init_logging_as(level, LogFormat::Json)
}

/// Installs the logger on stderr, writing `format`, as the global subscriber.
pub fn init_logging_as(level: LevelFilter, format: LogFormat) -> LogHandle {
    let (filter, handle) = reload::Layer::new(level);
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::filter::filter_fn(|m| {
            kept(m.target(), *m.level())
        }))
        .with(JsonLayer::with_format(std::io::stderr(), format))
        .try_init();
    LogHandle { handle }
}

/// Whether an event of a dependency is written. kube-client logs every answer of 5xx at
/// ERROR, without the URL or API group (`failed with status 503 Service Unavailable`): an
/// aggregated API that is down made hundreds of such lines per sync, tripping log-based
/// alerts, while the request's caller reports the same failure with its context (which
/// group, which object) at the level it deserves. Its debug lines stay.
fn kept(target: &str, level: tracing::Level) -> bool {
    !(target.starts_with("kube_client::client::builder") && level <= tracing::Level::WARN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kube_clients_contextless_failure_lines_are_dropped_and_nothing_else() {
        let builder = "kube_client::client::builder";
        assert!(!kept(builder, tracing::Level::ERROR));
        assert!(!kept(builder, tracing::Level::WARN));
        assert!(kept(builder, tracing::Level::DEBUG));
        assert!(kept("kube_client::client", tracing::Level::ERROR));
        assert!(kept("tether_gitops_agent::sync", tracing::Level::ERROR));
    }
    use std::sync::Arc;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn lines(buf: &Buf) -> Vec<Value> {
        text(buf)
            .lines()
            .map(|l| serde_json::from_str(l).expect("JSON line"))
            .collect()
    }

    fn text(buf: &Buf) -> String {
        let bytes = buf.0.lock().expect("lock").clone();
        String::from_utf8(bytes).expect("utf-8")
    }

    /// What `f` logs at level info in `format`.
    fn capture(format: LogFormat, f: impl FnOnce()) -> Buf {
        let buf = Buf::default();
        let (filter, _h) = reload::Layer::new(LevelFilter::INFO);
        let sub = tracing_subscriber::registry()
            .with(filter)
            .with(JsonLayer::with_format(buf.clone(), format));
        tracing::subscriber::with_default(sub, f);
        buf
    }

    #[test]
    fn events_carry_level_time_msg_mod_name_and_span_fields() {
        let buf = capture(LogFormat::Json, || {
            let span = tracing::info_span!("m", mod_name = "reverse_tunnel", agent_id = 7_i64);
            let _g = span.enter();
            tracing::info!(feature_name = "tunnel", "Feature status change");
            tracing::debug!("hidden at info");
        });
        let l = lines(&buf);
        assert_eq!(l.len(), 1, "{l:?}");
        assert_eq!(l[0]["level"], "info");
        assert_eq!(l[0]["msg"], "Feature status change");
        assert_eq!(l[0]["mod_name"], "reverse_tunnel");
        assert_eq!(l[0]["agent_id"], 7);
        assert_eq!(l[0]["feature_name"], "tunnel");
        assert!(l[0]["time"].as_str().is_some_and(|t| t.contains('T')));
    }

    #[test]
    fn lines_start_with_level_time_and_msg_as_gitlab_agentk_writes_them() {
        let buf = capture(LogFormat::Json, || {
            tracing::info!(agent_id = 1_i64, commit_id = "abc", "Synchronizing objects");
        });
        let text = text(&buf);
        assert!(text.starts_with(r#"{"level":"info","time":""#), "{text}");
        let msg_at = text
            .find(r#","msg":"Synchronizing objects","#)
            .expect("msg");
        let agent_at = text.find(r#""agent_id":1"#).expect("agent_id");
        assert!(msg_at < agent_at, "{text}");
        assert_eq!(lines(&buf)[0]["commit_id"], "abc");
    }

    #[test]
    fn the_level_changes_at_run_time() {
        let buf = Buf::default();
        let (filter, handle) = reload::Layer::new(LevelFilter::INFO);
        let sub = tracing_subscriber::registry()
            .with(filter)
            .with(JsonLayer::new(buf.clone()));
        let handle = LogHandle { handle };
        tracing::subscriber::with_default(sub, || {
            tracing::debug!("before");
            handle.set_level(LevelFilter::DEBUG);
            tracing::debug!("after");
        });
        let l = lines(&buf);
        assert_eq!(l.len(), 1);
        assert_eq!(l[0]["msg"], "after");
        assert_eq!(l[0]["level"], "debug");
        assert_eq!(l[0]["mod_name"], "observability");
    }

    #[test]
    fn a_fields_json_object_is_spread_into_the_line() {
        let buf = capture(LogFormat::Json, || {
            let ev = serde_json::json!({"eventType": "resourceStatus", "kind": "Deployment"});
            tracing::info!(fields_json = %ev, "resourceStatus");
        });
        let l = lines(&buf);
        assert_eq!(l[0]["eventType"], "resourceStatus");
        assert_eq!(l[0]["kind"], "Deployment");
        assert!(l[0].get("fields_json").is_none());
    }

    #[test]
    fn text_lines_read_time_level_msg_then_fields() {
        let buf = capture(LogFormat::Text, || {
            let span = tracing::info_span!("m", mod_name = "gitops", agent_id = 1_i64);
            let _g = span.enter();
            tracing::info!(project = "group/app", "Synchronizing objects");
            tracing::warn!(error = "no route to host", empty = "", "Cannot reach kas");
        });
        let text = text(&buf);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        let (time, rest) = lines[0].split_once(' ').expect("time first");
        // RFC 3339 in UTC, as in the JSON lines.
        assert!(
            time.len() >= 20 && time.as_bytes()[10] == b'T' && time.ends_with('Z'),
            "{time}"
        );
        assert_eq!(
            rest,
            "INFO  Synchronizing objects agent_id=1 mod_name=gitops project=group/app"
        );
        let (_, rest) = lines[1].split_once(' ').expect("time first");
        assert_eq!(
            rest,
            r#"WARN  Cannot reach kas agent_id=1 empty="" error="no route to host" mod_name=gitops"#
        );
    }

    #[test]
    fn formats_parse_by_name() {
        assert_eq!("json".parse::<LogFormat>().ok(), Some(LogFormat::Json));
        assert_eq!("TEXT".parse::<LogFormat>().ok(), Some(LogFormat::Text));
        assert!("xml".parse::<LogFormat>().is_err());
        assert_eq!(LogFormat::default(), LogFormat::Json);
        assert_eq!(LogFormat::Text.to_string(), "text");
    }

    #[test]
    fn levels_parse_by_name() {
        assert_eq!(parse_level("DEBUG").ok(), Some(LevelFilter::DEBUG));
        assert_eq!(parse_level("warn").ok(), Some(LevelFilter::WARN));
        assert!(parse_level("loud").is_err());
    }
}
