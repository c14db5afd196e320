//! Building HTML as text, I/O-free. Every value that comes from Git, the cluster or the
//! database goes through [`esc`] (or [`Html::text`]); only the fixed markup of this crate is
//! trusted, so a manifest naming an object `<script>` shows as text.

use std::fmt::Write as _;

/// Markup that is safe to send: built from fixed strings and escaped values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Html(String);

impl Html {
    /// Escaped text.
    pub fn text(s: &str) -> Html {
        Html(esc(s))
    }

    /// Fixed markup written in this crate (never data).
    pub fn raw(s: &'static str) -> Html {
        Html(s.to_owned())
    }

    /// Markup assembled by the web UI's own code, every value in it passed through [`esc`].
    pub(super) fn assembled(s: String) -> Html {
        Html(s)
    }

    /// Appends another fragment.
    pub fn push(&mut self, h: Html) {
        self.0.push_str(&h.0);
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }

    /// `<tag attrs>inner</tag>` with fixed tag and attributes.
    pub fn wrap(tag: &'static str, attrs: &str, inner: Html) -> Html {
        let sep = if attrs.is_empty() { "" } else { " " };
        Html(format!("<{tag}{sep}{attrs}>{}</{tag}>", inner.0))
    }
}

impl FromIterator<Html> for Html {
    fn from_iter<I: IntoIterator<Item = Html>>(iter: I) -> Self {
        let mut out = Html::default();
        for h in iter {
            out.push(h);
        }
        out
    }
}

/// Escapes text for element content and quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes a value for a URL's path segment or query.
pub fn url_part(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A link; `href` is built by the caller from fixed parts and [`url_part`]s, and escaped here.
pub fn link(href: &str, text: &str) -> Html {
    Html(format!("<a href=\"{}\">{}</a>", esc(href), esc(text)))
}

/// A table with a caption (named for screen readers) and a `data-filter` hook for the filter
/// box of the page's script.
#[derive(Debug)]
pub struct Table<'a> {
    pub id: &'a str,
    pub caption: &'a str,
    pub headers: &'a [&'a str],
    pub rows: Vec<Vec<Html>>,
    /// Shown instead of an empty table.
    pub empty: &'a str,
}

impl Table<'_> {
    pub fn render(self) -> Html {
        if self.rows.is_empty() {
            return Html(format!(
                "<p class=\"empty\" id=\"{}\">{}: {}</p>",
                esc(self.id),
                esc(self.caption),
                esc(self.empty)
            ));
        }
        let mut s = format!(
            "<table id=\"{}\"><caption>{}</caption><thead><tr>",
            esc(self.id),
            esc(self.caption)
        );
        for h in self.headers {
            let _ = write!(s, "<th scope=\"col\">{}</th>", esc(h));
        }
        s.push_str("</tr></thead><tbody>");
        for row in self.rows {
            s.push_str("<tr>");
            for cell in row {
                let _ = write!(s, "<td>{}</td>", cell.0);
            }
            s.push_str("</tr>");
        }
        s.push_str("</tbody></table>");
        Html(s)
    }
}

/// A status word as a badge whose class (colour) is chosen from a fixed list.
pub fn badge(status: &str) -> Html {
    let class = match status {
        "Current" | "Succeeded" | "connected" | "ok" | "Running" | "Available" => "good",
        "Failed" | "refused" | "error" | "Forbidden" => "bad",
        "InProgress" | "Pending" | "Unavailable" | "suspended" => "warn",
        _ => "neutral",
    };
    Html(format!(
        "<span class=\"badge {class}\">{}</span>",
        esc(status)
    ))
}

/// A POST form with the session's CSRF token, fixed action path pieces escaped.
pub fn post_form(action: &str, csrf: &str, fields: Html, button: &str) -> Html {
    Html(format!(
        "<form method=\"post\" action=\"{}\" class=\"inline\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{}\">{}\
         <button type=\"submit\">{}</button></form>",
        esc(action),
        esc(csrf),
        fields.0,
        esc(button)
    ))
}

/// A hidden form field.
pub fn hidden(name: &'static str, value: &str) -> Html {
    Html(format!(
        "<input type=\"hidden\" name=\"{name}\" value=\"{}\">",
        esc(value)
    ))
}

/// A labelled text field.
pub fn text_field(name: &'static str, label: &str, value: &str) -> Html {
    Html(format!(
        "<label for=\"f-{name}\">{}</label> <input id=\"f-{name}\" name=\"{name}\" value=\"{}\" required>",
        esc(label),
        esc(value)
    ))
}

/// Who is looking, for the page header.
#[derive(Debug, Clone, Default)]
pub struct Viewer {
    /// Display name (`admin token` for the admin-token login).
    pub name: String,
    /// `admin` or `viewer`.
    pub role: &'static str,
    pub csrf: String,
}

/// The whole page: header with navigation and the viewer, then `body`. The script and style
/// are served by kas (no CDN, no external font).
pub fn page(title: &str, viewer: Option<&Viewer>, body: Html) -> Html {
    let who = match viewer {
        Some(v) => format!(
            "<span class=\"who\">{} ({})</span> {}",
            esc(&v.name),
            v.role,
            post_form("/logout", &v.csrf, Html::default(), "Log out").0
        ),
        None => String::new(),
    };
    Html(format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{t} · tether</title><link rel=\"stylesheet\" href=\"/assets/app.css\">\
         <script src=\"/assets/app.js\" defer></script></head><body>\
         <a class=\"skip\" href=\"#main\">Skip to content</a>\
         <header><nav aria-label=\"Main\"><a href=\"/\">Agents</a> <a href=\"/projects\">Projects</a> \
         <a href=\"/browse\">Cluster</a></nav>{who}</header>\
         <main id=\"main\"><h1>{t}</h1>{body}</main></body></html>",
        t = esc(title),
        body = body.0
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn everything_dangerous_is_escaped() {
        assert_eq!(
            esc(r#"<script>alert("x")</script> & 'y'"#),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#39;y&#39;"
        );
        assert_eq!(Html::text("<b>").as_str(), "&lt;b&gt;");
        assert_eq!(
            link("/agents/1?q=\"x\"", "<i>").as_str(),
            "<a href=\"/agents/1?q=&quot;x&quot;\">&lt;i&gt;</a>"
        );
    }

    #[test]
    fn url_parts_are_percent_encoded() {
        assert_eq!(url_part("group/app x&y"), "group%2Fapp%20x%26y");
        assert_eq!(url_part("dude-1_a.b~"), "dude-1_a.b~");
    }

    #[test]
    fn a_table_has_a_caption_and_escaped_cells() {
        let t = Table {
            id: "objects",
            caption: "Objects <all>",
            headers: &["Name", "Status"],
            rows: vec![vec![Html::text("<x>"), badge("Failed")]],
            empty: "none",
        }
        .render();
        let s = t.as_str();
        assert!(s.starts_with("<table id=\"objects\"><caption>Objects &lt;all&gt;</caption>"));
        assert!(s.contains("<th scope=\"col\">Name</th>"));
        assert!(s.contains("<td>&lt;x&gt;</td>"));
        assert!(s.contains("<span class=\"badge bad\">Failed</span>"));
    }

    #[test]
    fn an_empty_table_says_so() {
        let t = Table {
            id: "t",
            caption: "Agents",
            headers: &["Name"],
            rows: vec![],
            empty: "none registered yet",
        }
        .render();
        assert_eq!(
            t.as_str(),
            "<p class=\"empty\" id=\"t\">Agents: none registered yet</p>"
        );
    }

    #[test]
    fn forms_carry_the_csrf_token_and_badges_pick_a_fixed_class() {
        let f = post_form(
            "/agents/1/reconcile",
            "tok\"en",
            Html::default(),
            "Reconcile now",
        );
        assert!(f.as_str().contains("name=\"csrf\" value=\"tok&quot;en\""));
        assert!(
            badge("<weird>")
                .as_str()
                .contains("class=\"badge neutral\">&lt;weird&gt;")
        );
    }

    #[test]
    fn the_page_escapes_title_and_viewer() {
        let v = Viewer {
            name: "<eve>".into(),
            role: "viewer",
            csrf: "c".into(),
        };
        let p = page("A <b>", Some(&v), Html::raw("<p>x</p>"));
        assert!(p.as_str().contains("<title>A &lt;b&gt; · tether</title>"));
        assert!(p.as_str().contains("&lt;eve&gt; (viewer)"));
        assert!(
            p.as_str()
                .contains("<main id=\"main\"><h1>A &lt;b&gt;</h1><p>x</p></main>")
        );
    }
}
