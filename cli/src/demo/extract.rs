//! Turning raw source formats into readable text: Project Gutenberg files, MediaWiki XML dumps,
//! RFC 822 e-mails (MIME, quoted-printable, base64), HTML, LaTeX, and long texts cut into
//! documents at paragraph boundaries.

/// Decode latin-1 bytes (every byte is a code point), or UTF-8 when valid.
pub fn decode_text(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_string(),
        Err(_) => bytes.iter().map(|&b| b as char).collect(),
    }
}

/// Normalise line ends to `\n`.
pub fn unix_newlines(s: &str) -> String {
    s.replace("\r\n", "\n").replace('\r', "\n")
}

/// The body of a Project Gutenberg text: between the `*** START OF ...` and `*** END OF ...`
/// lines (or after the old `*END*THE SMALL PRINT` header), the licence boilerplate removed.
/// Texts without the markers are returned unchanged.
pub fn strip_gutenberg(text: &str) -> &str {
    let upper = text.to_ascii_uppercase();
    let mut start = 0;
    for marker in ["*** START OF", "***START OF", "*END*THE SMALL PRINT"] {
        if let Some(i) = upper.find(marker) {
            start = text[i..]
                .find('\n')
                .map(|j| i + j + 1)
                .unwrap_or(text.len());
            break;
        }
    }
    let mut end = text.len();
    for marker in [
        "*** END OF",
        "***END OF",
        "END OF THE PROJECT GUTENBERG",
        "END OF THIS PROJECT GUTENBERG",
    ] {
        if let Some(i) = upper[start..].find(marker) {
            end = start + text[start..start + i].rfind('\n').unwrap_or(i);
            break;
        }
    }
    text[start..end].trim()
}

/// Cut `text` into documents of about `target` bytes at blank lines (a paragraph longer than
/// `2·target` is cut at line ends). Whitespace-only pieces are dropped.
pub fn split_paragraphs(text: &str, target: usize) -> Vec<String> {
    let mut docs = Vec::new();
    let mut cur = String::new();
    let flush = |cur: &mut String, docs: &mut Vec<String>| {
        let t = cur.trim();
        if !t.is_empty() {
            docs.push(t.to_string());
        }
        cur.clear();
    };
    for para in text.split("\n\n") {
        if para.len() > 2 * target {
            for line in para.lines() {
                cur.push_str(line);
                cur.push('\n');
                if cur.len() >= target {
                    flush(&mut cur, &mut docs);
                }
            }
            cur.push('\n');
            continue;
        }
        cur.push_str(para);
        cur.push_str("\n\n");
        if cur.len() >= target {
            flush(&mut cur, &mut docs);
        }
    }
    flush(&mut cur, &mut docs);
    docs
}

/// Decode the XML / HTML character entities that dumps and mails use.
pub fn decode_entities(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        // ';' is ASCII, so a byte search finds char boundaries only.
        let Some(j) = rest.as_bytes()[..rest.len().min(12)]
            .iter()
            .position(|&b| b == b';')
        else {
            out.push('&');
            rest = &rest[1..];
            continue;
        };
        let ent = &rest[1..j];
        let decoded = match ent {
            "lt" => Some('<'),
            "gt" => Some('>'),
            "amp" => Some('&'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            "nbsp" => Some(' '),
            "ndash" => Some('–'),
            "mdash" => Some('—'),
            "hellip" => Some('…'),
            "copy" => Some('©'),
            "reg" => Some('®'),
            _ if ent.starts_with("#x") || ent.starts_with("#X") => {
                u32::from_str_radix(&ent[2..], 16)
                    .ok()
                    .and_then(char::from_u32)
            }
            _ if ent.starts_with('#') => ent[1..].parse().ok().and_then(char::from_u32),
            _ => None,
        };
        match decoded {
            Some(c) => {
                out.push(c);
                rest = &rest[j + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Remove balanced `open … close` spans (nested), e.g. `{{ … }}` templates.
fn remove_nested(s: &str, open: &str, close: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut depth = 0usize;
    let mut i = 0;
    let b = s.as_bytes();
    while i < s.len() {
        if s[i..].starts_with(open) {
            depth += 1;
            i += open.len();
        } else if depth > 0 && s[i..].starts_with(close) {
            depth -= 1;
            i += close.len();
        } else {
            let ch_len = utf8_len(b[i]);
            if depth == 0 {
                out.push_str(&s[i..i + ch_len]);
            }
            i += ch_len;
        }
    }
    out
}

fn utf8_len(first: u8) -> usize {
    match first {
        0x00..=0x7f => 1,
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        _ => 4,
    }
}

/// Remove `<tag …>…</tag>` spans (case-insensitive) and self-closing `<tag …/>`.
fn remove_elements(s: &str, tag: &str) -> String {
    let lower = s.to_ascii_lowercase();
    let open = format!("<{tag}");
    let close = format!("</{tag}>");
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while let Some(off) = lower[i..].find(&open) {
        let start = i + off;
        out.push_str(&s[i..start]);
        let Some(gt) = lower[start..].find('>') else {
            i = s.len();
            break;
        };
        let tag_end = start + gt + 1;
        if s[..tag_end].ends_with("/>") {
            i = tag_end;
            continue;
        }
        match lower[tag_end..].find(&close) {
            Some(c) => i = tag_end + c + close.len(),
            None => i = s.len(),
        }
    }
    if i < s.len() {
        out.push_str(&s[i..]);
    }
    out
}

/// Strip every `<…>` tag, keeping the text between tags; block-level tags become line breaks,
/// inline tags disappear.
pub fn strip_tags(s: &str) -> String {
    const BLOCK: &[&str] = &[
        "p",
        "br",
        "div",
        "tr",
        "li",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "table",
        "ul",
        "ol",
        "blockquote",
        "pre",
        "hr",
    ];
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('<') {
        out.push_str(&rest[..i]);
        let Some(j) = rest[i..].find('>') else {
            out.push_str(&rest[i..]);
            return out;
        };
        let name: String = rest[i + 1..i + j]
            .trim_start_matches('/')
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect::<String>()
            .to_ascii_lowercase();
        if BLOCK.contains(&name.as_str()) {
            out.push('\n');
        }
        rest = &rest[i + j + 1..];
    }
    out.push_str(rest);
    out
}

fn collapse_blank_lines(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut blank = 0;
    for line in s.lines() {
        let line = line.trim_end();
        if line.trim().is_empty() {
            blank += 1;
            if blank == 1 {
                out.push('\n');
            }
        } else {
            blank = 0;
            out.push_str(line);
            out.push('\n');
        }
    }
    out.trim().to_string()
}

/// MediaWiki markup to readable text: templates, tables, references, comments, files and
/// categories removed; links and external links replaced by their text; bold, italics and
/// heading marks dropped; HTML tags and entities resolved.
pub fn wiki_to_text(markup: &str) -> String {
    let s = decode_entities(markup);
    let s = remove_nested(&s, "<!--", "-->");
    let s = remove_elements(&s, "ref");
    let s = remove_elements(&s, "gallery");
    let s = remove_elements(&s, "math");
    let s = remove_nested(&s, "{{", "}}");
    let s = remove_nested(&s, "{|", "|}");
    // Links: [[File:…]] and [[Category:…]] go; [[target|label]] -> label; [[target]] -> target.
    let mut out = String::with_capacity(s.len());
    let mut rest = s.as_str();
    while let Some(i) = rest.find("[[") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        // The matching "]]", allowing one level of nesting (captions with links).
        let mut depth = 1;
        let mut j = 0;
        let bytes = after.as_bytes();
        while j + 1 < after.len() && depth > 0 {
            if bytes[j..j + 2] == *b"[[" {
                depth += 1;
                j += 2;
            } else if bytes[j..j + 2] == *b"]]" {
                depth -= 1;
                j += 2;
            } else {
                j += utf8_len(bytes[j]);
            }
        }
        if depth > 0 {
            rest = after;
            continue;
        }
        let inner = &after[..j - 2];
        let lower = inner.to_ascii_lowercase();
        // Files, categories and interlanguage links ([[fr:…]]) are not text.
        let prefix = lower.split(':').next().unwrap_or("");
        let skip = lower.contains(':')
            && (["file", "image", "category", "media"].contains(&prefix)
                || (2..=3).contains(&prefix.len())
                    && prefix.chars().all(|c| c.is_ascii_lowercase()));
        if !skip {
            out.push_str(inner.rsplit('|').next().unwrap_or(inner));
        }
        rest = &after[j..];
    }
    out.push_str(rest);
    // External links [http://… label] -> label.
    let mut s2 = String::with_capacity(out.len());
    let mut rest = out.as_str();
    while let Some(i) = rest.find("[http") {
        s2.push_str(&rest[..i]);
        match rest[i..].find(']') {
            Some(j) => {
                let inner = &rest[i + 1..i + j];
                if let Some(sp) = inner.find(' ') {
                    s2.push_str(&inner[sp + 1..]);
                }
                rest = &rest[i + j + 1..];
            }
            None => {
                rest = &rest[i + 1..];
            }
        }
    }
    s2.push_str(rest);
    let s = s2.replace("'''", "").replace("''", "");
    let s: String = s
        .lines()
        .map(|l| {
            let t = l.trim();
            if t.starts_with('=') && t.ends_with('=') {
                t.trim_matches('=').trim().to_string()
            } else if t.starts_with("__") && t.ends_with("__") {
                String::new()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    collapse_blank_lines(&strip_tags(&s))
}

/// Articles `(title, text)` of a MediaWiki XML dump (main namespace, no redirects), text still
/// in wiki markup.
pub fn wiki_pages(xml: &str) -> Vec<(String, String)> {
    let mut pages = Vec::new();
    let between = |s: &str, open: &str, close: &str| -> Option<String> {
        let i = s.find(open)? + open.len();
        let j = s[i..].find(close)?;
        Some(s[i..i + j].to_string())
    };
    for page in xml.split("<page>").skip(1) {
        let page = page.split("</page>").next().unwrap_or(page);
        if page.contains("<redirect") || between(page, "<ns>", "</ns>").as_deref() != Some("0") {
            continue;
        }
        let (Some(title), Some(text_start)) =
            (between(page, "<title>", "</title>"), page.find("<text"))
        else {
            continue;
        };
        let Some(gt) = page[text_start..].find('>') else {
            continue;
        };
        let body = &page[text_start + gt + 1..];
        let body = body.split("</text>").next().unwrap_or(body);
        pages.push((decode_entities(&title), body.to_string()));
    }
    pages
}

/// HTML to text: scripts and styles removed, tags stripped, entities decoded, blank lines
/// collapsed.
pub fn html_to_text(html: &str) -> String {
    let s = remove_elements(html, "script");
    let s = remove_elements(&s, "style");
    let text = decode_entities(&strip_tags(&s)).replace('\u{a0}', " ");
    let lines: Vec<String> = text
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    collapse_blank_lines(&lines.join("\n"))
}

fn decode_base64(s: &str) -> Vec<u8> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes() {
        if let Some(v) = val(c) {
            acc = (acc << 6) | v;
            bits += 6;
            if bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
                acc &= (1 << bits) - 1;
            }
        }
    }
    out
}

fn decode_quoted_printable(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'=' {
            if i + 1 < b.len() && b[i + 1] == b'\n' {
                i += 2;
                continue;
            }
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (
                b.get(i + 1).and_then(|&c| hex(c)),
                b.get(i + 2).and_then(|&c| hex(c)),
            ) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// Header fields (lower-cased names, continuation lines unfolded) and the body of a message.
fn split_message(raw: &str) -> (Vec<(String, String)>, &str) {
    let (head, body) = match raw.find("\n\n") {
        Some(i) => (&raw[..i], &raw[i + 2..]),
        None => (raw, ""),
    };
    let mut headers: Vec<(String, String)> = Vec::new();
    for line in head.lines() {
        if line.starts_with([' ', '\t']) {
            if let Some(last) = headers.last_mut() {
                last.1.push(' ');
                last.1.push_str(line.trim());
            }
        } else if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    (headers, body)
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Text of one MIME entity, preferring `text/plain` parts (or HTML converted to text when
/// `html_ok`).
fn entity_text(raw: &str, html_ok: bool, depth: usize) -> Option<String> {
    let (headers, body) = split_message(raw);
    let ctype = header(&headers, "content-type")
        .unwrap_or("text/plain")
        .to_string();
    let lower = ctype.to_ascii_lowercase();
    if lower.starts_with("multipart/") && depth < 4 {
        let boundary = ctype
            .split(';')
            .find_map(|p| {
                p.trim()
                    .strip_prefix("boundary=")
                    .or_else(|| p.trim().strip_prefix("BOUNDARY="))
            })?
            .trim_matches('"')
            .to_string();
        let delim = format!("--{boundary}");
        let parts: Vec<&str> = body
            .split(delim.as_str())
            .skip(1)
            .filter(|p| !p.starts_with("--"))
            .collect();
        // Plain text first, then HTML.
        for want_html in [false, true] {
            for p in &parts {
                let p = p.trim_start_matches('\n');
                let (h, _) = split_message(p);
                let t = header(&h, "content-type")
                    .unwrap_or("text/plain")
                    .to_ascii_lowercase();
                if (t.starts_with("text/html")) == want_html || t.starts_with("multipart/") {
                    if let Some(text) = entity_text(p, html_ok, depth + 1) {
                        return Some(text);
                    }
                }
            }
        }
        return None;
    }
    let is_html = lower.starts_with("text/html");
    if !(lower.starts_with("text/plain") || is_html && html_ok) {
        return None;
    }
    let enc = header(&headers, "content-transfer-encoding")
        .unwrap_or("")
        .to_ascii_lowercase();
    let bytes = match enc.as_str() {
        "base64" => decode_base64(body),
        "quoted-printable" => decode_quoted_printable(body),
        _ => body.as_bytes().to_vec(),
    };
    let text = decode_text(&bytes);
    Some(if is_html { html_to_text(&text) } else { text })
}

/// The subject and readable body of an RFC 822 message (`text/plain`, or HTML converted to
/// text when `html_ok`), with transfer encodings decoded. Mailing-list footers after a
/// `___…` rule are dropped.
pub fn email_to_text(raw: &str, html_ok: bool) -> Option<String> {
    let raw = unix_newlines(raw);
    let (headers, _) = split_message(&raw);
    let subject = header(&headers, "subject").unwrap_or("").to_string();
    let body = entity_text(&raw, html_ok, 0)?;
    let body = match body.find("\n_______________________________________________") {
        Some(i) => body[..i].to_string(),
        None => body,
    };
    let body = collapse_blank_lines(&body);
    if body.is_empty() {
        return None;
    }
    Some(if subject.is_empty() {
        body
    } else {
        format!("Subject: {subject}\n\n{body}")
    })
}

/// LaTeX source with comment lines removed (as RedPajama's arXiv slice does).
pub fn latex_without_comments(tex: &str) -> String {
    let kept: Vec<&str> = tex
        .lines()
        .filter(|l| !l.trim_start().starts_with('%'))
        .collect();
    collapse_blank_lines(&kept.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gutenberg_boilerplate_is_trimmed() {
        let t = "The Project Gutenberg EBook of X\nlicence blah\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\n\nChapter 1\nIt was.\n\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nmore licence\n";
        assert_eq!(strip_gutenberg(t), "Chapter 1\nIt was.");
        assert_eq!(strip_gutenberg("no markers\n"), "no markers");
    }

    #[test]
    fn paragraphs_become_documents() {
        let text = (0..10)
            .map(|i| format!("paragraph {i} {}", "x".repeat(50)))
            .collect::<Vec<_>>()
            .join("\n\n");
        let docs = split_paragraphs(&text, 150);
        assert!(docs.len() >= 3 && docs.len() <= 5, "{}", docs.len());
        assert!(docs
            .iter()
            .all(|d| !d.starts_with('\n') && d.contains("paragraph")));
        assert_eq!(docs.join("\n\n").matches("paragraph").count(), 10);
    }

    #[test]
    fn wiki_markup_is_stripped() {
        let m = "{{Infobox|a={{nested}}}}'''Anarchism''' is a [[political philosophy]] that [[self-governance|self-governs]].&lt;ref&gt;Woodcock&lt;/ref&gt; See [http://x.org the library].\n<!-- hidden -->\n== History ==\n[[File:A.png|thumb|cap [[link]]]]\n{| class=wikitable\n|a\n|}\nDone &amp; dusted.\n[[Category:Political culture]]";
        let t = wiki_to_text(m);
        assert_eq!(
            t,
            "Anarchism is a political philosophy that self-governs. See the library.\n\nHistory\n\nDone & dusted."
        );
    }

    #[test]
    fn wiki_dump_pages() {
        let xml = "<page><title>A &amp; B</title><ns>0</ns><revision><text xml:space=\"preserve\">'''A''' text</text></revision></page><page><title>R</title><ns>0</ns><redirect title=\"A\" /><text>#REDIRECT [[A]]</text></page><page><title>Talk:A</title><ns>1</ns><text>x</text></page>";
        let pages = wiki_pages(xml);
        assert_eq!(
            pages,
            vec![("A & B".to_string(), "'''A''' text".to_string())]
        );
    }

    #[test]
    fn emails_are_decoded() {
        let plain = "From: a@b\nSubject: Re: help\nContent-Type: text/plain\nContent-Transfer-Encoding: quoted-printable\n\nCaf=C3=A9 is =\nopen.\n\n_______________________________________________\nlist footer\n";
        assert_eq!(
            email_to_text(plain, false).unwrap(),
            "Subject: Re: help\n\nCafé is open."
        );
        let multi = "Subject: offer\nContent-Type: multipart/alternative; boundary=\"XX\"\n\n--XX\nContent-Type: text/html\nContent-Transfer-Encoding: base64\n\nPGI+QmlnPC9iPiBzYWxlICZhbXA7IG1vcmU=\n--XX--\n";
        assert_eq!(
            email_to_text(multi, true).unwrap(),
            "Subject: offer\n\nBig sale & more"
        );
        assert!(
            email_to_text(multi, false).is_none(),
            "HTML only when asked for"
        );
    }

    #[test]
    fn html_and_latex() {
        assert_eq!(html_to_text("<html><style>x{}</style><p>Hello&nbsp;<b>you</b></p><script>bad()</script><p>next</p></html>"), "Hello you\n\nnext");
        assert_eq!(
            latex_without_comments("\\section{A}\n% comment\ntext\n"),
            "\\section{A}\ntext"
        );
        assert_eq!(decode_entities("&#233;&#x41;&bogus; &"), "éA&bogus; &");
        assert_eq!(
            decode_entities("&lt;ref&gt;هادي العلوي &"),
            "<ref>هادي العلوي &"
        );
        assert_eq!(wiki_to_text("[[مثال|نص]] و[[x]]"), "نص وx");
    }
}
