//! The "No HTML" rule of GitHub Flavored Markdown for MIMI (draft-ietf-mimi-content §"Specifics
//! of Github Flavored Markdown in MIMI"): before sending, the opening `<` of every HTML tag
//! (GFM §6.10: open and closing tags, comments, processing instructions, declarations, CDATA)
//! becomes `&lt;`, so no receiver ever renders raw HTML from a peer.
//!
//! Only what GFM would parse as a tag is touched: `a < b`, `<https://example.com>` (an autolink)
//! and anything inside a code span or fenced code block stay as written, since GFM shows those
//! literally anyway. Indented code blocks are not recognised (they need the block structure);
//! a tag inside one is escaped too, which only changes how that code reads.

/// `text` with the `<` of each HTML tag outside code replaced by `&lt;`.
pub fn no_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut fence: Option<Fence> = None;
    let mut paragraph = String::new();
    for line in text.split_inclusive('\n') {
        match &fence {
            Some(open) => {
                out.push_str(line);
                if open.is_closed_by(line) {
                    fence = None;
                }
            }
            None => match Fence::opened_by(line) {
                Some(opened) => {
                    // Inline code spans cannot cross a fence: finish the text before it.
                    out.push_str(&escape_inline(&paragraph));
                    paragraph.clear();
                    out.push_str(line);
                    fence = Some(opened);
                }
                None => paragraph.push_str(line),
            },
        }
    }
    out.push_str(&escape_inline(&paragraph));
    out
}

/// An open fenced code block: its character and length.
struct Fence {
    marker: u8,
    len: usize,
}

impl Fence {
    /// A fence opening line: up to 3 spaces, then 3+ backticks or tildes (a backtick fence's
    /// info string may not contain a backtick).
    fn opened_by(line: &str) -> Option<Self> {
        let rest = strip_indent(line)?;
        let marker = *rest.as_bytes().first()?;
        if marker != b'`' && marker != b'~' {
            return None;
        }
        let len = rest.bytes().take_while(|b| *b == marker).count();
        if len < 3 || (marker == b'`' && rest[len..].contains('`')) {
            return None;
        }
        Some(Self { marker, len })
    }

    /// A closing line: up to 3 spaces, at least as many of the same character, then blanks.
    fn is_closed_by(&self, line: &str) -> bool {
        let Some(rest) = strip_indent(line) else {
            return false;
        };
        let len = rest.bytes().take_while(|b| *b == self.marker).count();
        len >= self.len && rest[len..].trim().is_empty()
    }
}

/// The line without up to 3 leading spaces; `None` if it is indented further (code).
fn strip_indent(line: &str) -> Option<&str> {
    let spaces = line.bytes().take_while(|b| *b == b' ').count();
    (spaces <= 3).then(|| &line[spaces..])
}

/// Escapes tags in running text, skipping code spans and backslash-escaped `<`. Code spans and
/// raw HTML bind with equal precedence in GFM, so whichever starts first wins: one left-to-right
/// scan decides both.
fn escape_inline(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let mut copied = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2, // an escaped character is literal, `\<` included
            b'`' => {
                let run = bytes[i..].iter().take_while(|b| **b == b'`').count();
                i = match closing_backticks(bytes, i + run, run) {
                    Some(end) => end,
                    None => i + run, // no matching run: the backticks are literal text
                };
            }
            b'<' if tag_len(&text[i..]).is_some() => {
                out.push_str(&text[copied..i]);
                out.push_str("&lt;");
                i += 1;
                copied = i;
            }
            _ => i += 1,
        }
    }
    out.push_str(&text[copied..]);
    out
}

/// The end of the code span whose closing run of exactly `run` backticks starts at or after
/// `from`.
fn closing_backticks(bytes: &[u8], from: usize, run: usize) -> Option<usize> {
    let mut i = from;
    while i < bytes.len() {
        if bytes[i] == b'`' {
            let len = bytes[i..].iter().take_while(|b| **b == b'`').count();
            if len == run {
                return Some(i + len);
            }
            i += len;
        } else {
            i += 1;
        }
    }
    None
}

/// The length of the HTML tag at the start of `s` (which starts with `<`), if there is one.
fn tag_len(s: &str) -> Option<usize> {
    let rest = &s[1..];
    if let Some(body) = rest.strip_prefix("!--") {
        return body.find("-->").map(|end| 4 + end + 3);
    }
    if let Some(body) = rest.strip_prefix("![CDATA[") {
        return body.find("]]>").map(|end| 9 + end + 3);
    }
    if let Some(body) = rest.strip_prefix('?') {
        return body.find("?>").map(|end| 2 + end + 2);
    }
    if let Some(body) = rest.strip_prefix('!') {
        let starts_with_letter = body.bytes().next().is_some_and(|b| b.is_ascii_alphabetic());
        return starts_with_letter
            .then(|| body.find('>').map(|end| 2 + end + 1))
            .flatten();
    }
    if let Some(body) = rest.strip_prefix('/') {
        let name = tag_name_len(body)?;
        let blank = whitespace_len(&body[name..]);
        return body[name + blank..]
            .starts_with('>')
            .then_some(2 + name + blank + 1);
    }
    open_tag_len(rest).map(|len| 1 + len)
}

/// `tagname attribute* whitespace? /? >` after the `<`.
fn open_tag_len(s: &str) -> Option<usize> {
    let mut i = tag_name_len(s)?;
    loop {
        let blank = whitespace_len(&s[i..]);
        match attribute_len(&s[i + blank..]) {
            Some(attr) if blank > 0 => i += blank + attr,
            _ => {
                i += blank;
                break;
            }
        }
    }
    if s[i..].starts_with("/>") {
        return Some(i + 2);
    }
    s[i..].starts_with('>').then_some(i + 1)
}

/// `[A-Za-z][A-Za-z0-9-]*`.
fn tag_name_len(s: &str) -> Option<usize> {
    let bytes = s.as_bytes();
    if !bytes.first()?.is_ascii_alphabetic() {
        return None;
    }
    Some(
        bytes
            .iter()
            .take_while(|b| b.is_ascii_alphanumeric() || **b == b'-')
            .count(),
    )
}

/// An attribute name with an optional `= value` (unquoted, 'single' or "double" quoted).
fn attribute_len(s: &str) -> Option<usize> {
    let bytes = s.as_bytes();
    let first = *bytes.first()?;
    if !(first.is_ascii_alphabetic() || first == b'_' || first == b':') {
        return None;
    }
    let name = bytes
        .iter()
        .take_while(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
        .count();
    let before_eq = whitespace_len(&s[name..]);
    let Some(after_eq) = s[name + before_eq..].strip_prefix('=') else {
        return Some(name);
    };
    let blank = whitespace_len(after_eq);
    let value = value_len(&after_eq[blank..])?;
    Some(name + before_eq + 1 + blank + value)
}

fn value_len(s: &str) -> Option<usize> {
    match s.as_bytes().first()? {
        quote @ (b'"' | b'\'') => s[1..].find(char::from(*quote)).map(|end| 1 + end + 1),
        _ => {
            let len = s
                .bytes()
                .take_while(|b| !b.is_ascii_whitespace() && !b"\"'=<>`".contains(b))
                .count();
            (len > 0).then_some(len)
        }
    }
}

fn whitespace_len(s: &str) -> usize {
    s.bytes().take_while(u8::is_ascii_whitespace).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn tags_of_every_kind_are_escaped() {
        for (input, want) in [
            ("<b>bold</b>", "&lt;b>bold&lt;/b>"),
            (
                "<img src=\"x.png\" alt='a b' data-x=1 />",
                "&lt;img src=\"x.png\" alt='a b' data-x=1 />",
            ),
            ("<br/>", "&lt;br/>"),
            ("hi <!-- hidden --> there", "hi &lt;!-- hidden --> there"),
            ("<?php echo 1; ?>", "&lt;?php echo 1; ?>"),
            ("<!DOCTYPE html>", "&lt;!DOCTYPE html>"),
            ("<![CDATA[ x ]]>", "&lt;![CDATA[ x ]]>"),
            ("</div >", "&lt;/div >"),
            ("<a\nhref=\"x\">", "&lt;a\nhref=\"x\">"),
        ] {
            assert_eq!(no_html(input), want, "{input:?}");
        }
    }

    #[test]
    fn what_is_no_tag_stays_as_written() {
        for text in [
            "a < b and c > d",
            "1 <2",
            "<https://example.com>",
            "<bob@wave.test>",
            "<b",
            "<a href=>",
            "<!-- never closed",
            "**bold** _it_ ~~strike~~ - [x] done",
            "\\<b>",
            "héllo <",
        ] {
            assert_eq!(no_html(text), text, "{text:?}");
        }
    }

    #[test]
    fn code_stays_literal() {
        assert_eq!(no_html("use `<b>` here"), "use `<b>` here");
        assert_eq!(no_html("``a ` <b> ``"), "``a ` <b> ``");
        assert_eq!(no_html("`unclosed <b>"), "`unclosed &lt;b>");
        let fenced = "before <i>\n```html\n<div>\n```\nafter <i>";
        assert_eq!(
            no_html(fenced),
            "before &lt;i>\n```html\n<div>\n```\nafter &lt;i>"
        );
        let tilde = "~~~~\n<p>\n~~~\n<p>\n~~~~\n<p>";
        assert_eq!(no_html(tilde), "~~~~\n<p>\n~~~\n<p>\n~~~~\n&lt;p>");
        let unclosed = "```\n<p>";
        assert_eq!(no_html(unclosed), unclosed);
    }

    proptest! {
        #[test]
        fn never_panics_and_only_adds_escapes(text in "\\PC{0,64}") {
            let out = no_html(&text);
            prop_assert_eq!(out.replace("&lt;", "<"), text.replace("&lt;", "<"));
        }

        #[test]
        fn escaping_is_idempotent(text in "[<>/a-z!?\\-\\[\\] =\"'`\n]{0,40}") {
            let out = no_html(&text);
            // Escaping again finds nothing new: no tag is left for a receiver to render.
            prop_assert_eq!(no_html(&out), out);
        }
    }
}
