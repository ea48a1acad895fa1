//! containerd's filter language, as used by `List` (containerd's `filters`
//! package): a request carries several filters, any of which may match; a
//! filter is selectors joined by `,`, all of which must match. A selector is
//! `fieldpath [op value]`, op one of `==`, `!=`, `~=` (regular expression), and
//! a bare field path tests presence. Field paths are dot-separated words or
//! double-quoted strings (`labels."containerd.io/gc.root"`). Values are quoted
//! strings or runs of anything but `,` and white space; `~=` also accepts
//! `/re/` and `|re|`.
//!
//! This module owns parsing and matching only; what a field means is the
//! caller's [`Fields`] implementation. It also owns what both filter
//! languages of the crate share: the one [`FilterError`] and the character
//! `Cursor` their parsers lex with (`checkpoint::filter`, the checkpoint
//! list's language, is built on them).

use regex::Regex;

use crate::error::{Classify, ErrorKind};

/// A filter that does not parse, in either filter language.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("filter {input:?}: {message} at column {column}")]
pub struct FilterError {
    pub input: String,
    /// 1-based character column where the problem is; one past the last
    /// character when the input ended too early.
    pub column: usize,
    pub message: String,
}

impl Classify for FilterError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::InvalidArgument
    }
}

/// A position in a filter's characters, for hand-written recursive descent:
/// what a token is depends on where it stands in both languages, so they lex
/// characters rather than a token stream. Columns count characters.
pub(crate) struct Cursor<'a> {
    input: &'a str,
    pub(crate) chars: Vec<char>,
    pub(crate) pos: usize,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(input: &'a str) -> Self {
        Cursor {
            input,
            chars: input.chars().collect(),
            pos: 0,
        }
    }

    /// An error at character offset `pos` (column `pos + 1`).
    pub(crate) fn error_at(&self, pos: usize, message: impl Into<String>) -> FilterError {
        FilterError {
            input: self.input.to_owned(),
            column: pos + 1,
            message: message.into(),
        }
    }

    /// The character at the position, white space included.
    pub(crate) fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    pub(crate) fn skip_space(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.pos += 1;
        }
    }

    /// Whether `text` comes next, white space not skipped.
    pub(crate) fn looking_at(&self, text: &str) -> bool {
        let end = self.pos + text.chars().count();
        self.chars
            .get(self.pos..end)
            .is_some_and(|next| next.iter().copied().eq(text.chars()))
    }

    /// Skips space, then consumes `text` if it comes next.
    pub(crate) fn eat(&mut self, text: &str) -> bool {
        self.skip_space();
        if self.looking_at(text) {
            self.pos += text.chars().count();
            true
        } else {
            false
        }
    }

    /// How many characters from offset `at` on satisfy `pred`.
    pub(crate) fn run_len(&self, at: usize, pred: impl Fn(char) -> bool) -> usize {
        self.chars[at..].iter().take_while(|&&c| pred(c)).count()
    }

    /// Consumes the run of characters satisfying `pred` and returns it.
    pub(crate) fn take_while(&mut self, pred: impl Fn(char) -> bool) -> String {
        let start = self.pos;
        self.pos += self.run_len(start, pred);
        self.text(start, self.pos)
    }

    /// The characters from offset `start` to `end`.
    pub(crate) fn text(&self, start: usize, end: usize) -> String {
        self.chars[start..end].iter().collect()
    }
}

/// Supplies the value of a field path of the object being matched.
pub trait Fields {
    /// `None` when the field is not present.
    fn field(&self, path: &[String]) -> Option<String>;
}

#[derive(Debug, Clone)]
enum Operator {
    Present,
    Equal(String),
    NotEqual(String),
    Matches(Regex),
}

#[derive(Debug, Clone)]
struct Selector {
    path: Vec<String>,
    op: Operator,
}

impl Selector {
    fn matches(&self, object: &dyn Fields) -> bool {
        let value = object.field(&self.path);
        match &self.op {
            Operator::Present => value.is_some(),
            Operator::Equal(expected) => value.as_deref() == Some(expected.as_str()),
            // containerd compares a missing field as the empty string here.
            Operator::NotEqual(expected) => value.unwrap_or_default() != *expected,
            Operator::Matches(re) => re.is_match(&value.unwrap_or_default()),
        }
    }
}

/// Filters of one request: matches when any of them matches; no filter matches everything.
#[derive(Debug, Clone, Default)]
pub struct FilterSet {
    alternatives: Vec<Vec<Selector>>,
}

impl FilterSet {
    pub fn parse_all<S: AsRef<str>>(filters: &[S]) -> Result<FilterSet, FilterError> {
        let mut alternatives = Vec::new();
        for text in filters {
            let text = text.as_ref();
            if text.is_empty() {
                // containerd treats an empty filter as "always".
                alternatives.push(Vec::new());
                continue;
            }
            alternatives.push(Parser::new(text).selectors()?);
        }
        Ok(FilterSet { alternatives })
    }

    pub fn matches(&self, object: &dyn Fields) -> bool {
        self.alternatives.is_empty()
            || self
                .alternatives
                .iter()
                .any(|all| all.iter().all(|selector| selector.matches(object)))
    }
}

/// containerd's grammar over a [`Cursor`]; white space may stand between
/// any two tokens.
struct Parser<'a> {
    cursor: Cursor<'a>,
}

impl<'a> Parser<'a> {
    fn new(input: &'a str) -> Self {
        Parser {
            cursor: Cursor::new(input),
        }
    }

    fn error(&self, message: impl Into<String>) -> FilterError {
        self.cursor.error_at(self.cursor.pos, message)
    }

    /// The next character after white space.
    fn peek(&mut self) -> Option<char> {
        self.cursor.skip_space();
        self.cursor.peek()
    }

    fn selectors(&mut self) -> Result<Vec<Selector>, FilterError> {
        let mut all = vec![self.selector()?];
        loop {
            match self.peek() {
                None => return Ok(all),
                Some(',') => {
                    self.cursor.pos += 1;
                    all.push(self.selector()?);
                }
                Some(c) => return Err(self.error(format!("unexpected {c:?}, expected ',' or the end"))),
            }
        }
    }

    fn selector(&mut self) -> Result<Selector, FilterError> {
        let path = self.fieldpath()?;
        let op_text = match self.peek() {
            None | Some(',') => {
                return Ok(Selector {
                    path,
                    op: Operator::Present,
                })
            }
            Some('=' | '!' | '~') => self.operator()?,
            Some(c) => return Err(self.error(format!("unexpected {c:?}, expected an operator (==, != or ~=)"))),
        };
        let regex = op_text == "~=";
        let value = self.value(regex)?;
        let op = match op_text.as_str() {
            "==" => Operator::Equal(value),
            "!=" => Operator::NotEqual(value),
            _ => {
                let re =
                    Regex::new(&value).map_err(|e| self.error(format!("invalid regular expression {value:?}: {e}")))?;
                Operator::Matches(re)
            }
        };
        Ok(Selector { path, op })
    }

    fn fieldpath(&mut self) -> Result<Vec<String>, FilterError> {
        let mut path = vec![self.field()?];
        while self.peek() == Some('.') {
            self.cursor.pos += 1;
            path.push(self.field()?);
        }
        Ok(path)
    }

    fn field(&mut self) -> Result<String, FilterError> {
        match self.peek() {
            Some('"') => self.quoted('"'),
            Some(c) if c.is_ascii_alphanumeric() || c == '_' => {
                Ok(self.cursor.take_while(|c| c.is_ascii_alphanumeric() || c == '_'))
            }
            Some(c) => Err(self.error(format!("unexpected {c:?}, expected a field name"))),
            None => Err(self.error("unexpected end, expected a field name")),
        }
    }

    fn operator(&mut self) -> Result<String, FilterError> {
        let start = self.cursor.pos;
        let op = self.cursor.take_while(|c| matches!(c, '=' | '!' | '~'));
        match op.as_str() {
            "==" | "!=" | "~=" => Ok(op),
            _ => {
                self.cursor.pos = start;
                Err(self.error(format!("{op:?} is not an operator, expected ==, != or ~=")))
            }
        }
    }

    fn value(&mut self, regex: bool) -> Result<String, FilterError> {
        match self.peek() {
            None => Err(self.error("unexpected end, expected a value")),
            Some('"') => self.quoted('"'),
            Some(q @ ('/' | '|')) => {
                if regex {
                    self.quoted(q)
                } else {
                    Err(self.error(format!("{q:?} quoting is only allowed with ~=")))
                }
            }
            Some(',') => Err(self.error("unexpected ',', expected a value")),
            Some(_) => Ok(self.cursor.take_while(|c| c != ',' && !c.is_whitespace())),
        }
    }

    /// A string in `quote`s with Go-style escapes; for `/` and `|` quotes only
    /// the quote itself is escapable, everything else is kept for the regex.
    fn quoted(&mut self, quote: char) -> Result<String, FilterError> {
        let open = self.cursor.pos;
        self.cursor.pos += 1;
        let mut out = String::new();
        loop {
            let Some(c) = self.cursor.peek() else {
                self.cursor.pos = open;
                return Err(self.error("unterminated quoted string"));
            };
            self.cursor.pos += 1;
            if c == quote {
                return Ok(out);
            }
            if c != '\\' {
                out.push(c);
                continue;
            }
            let Some(e) = self.cursor.peek() else {
                return Err(self.error("unterminated escape"));
            };
            self.cursor.pos += 1;
            if quote != '"' {
                if e != quote {
                    out.push('\\');
                }
                out.push(e);
                continue;
            }
            match e {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                'r' => out.push('\r'),
                'a' => out.push('\u{7}'),
                'b' => out.push('\u{8}'),
                'f' => out.push('\u{c}'),
                'v' => out.push('\u{b}'),
                '\\' | '"' | '\'' => out.push(e),
                'x' | 'u' | 'U' => {
                    let len = match e {
                        'x' => 2,
                        'u' => 4,
                        _ => 8,
                    };
                    let digits: String = self.cursor.chars.iter().skip(self.cursor.pos).take(len).collect();
                    let code = (digits.len() == len)
                        .then(|| u32::from_str_radix(&digits, 16).ok())
                        .flatten()
                        .and_then(char::from_u32)
                        .ok_or_else(|| self.error(format!("invalid escape \\{e}{digits}")))?;
                    self.cursor.pos += len;
                    out.push(code);
                }
                other => return Err(self.error(format!("invalid escape \\{other}"))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    struct Obj {
        name: &'static str,
        labels: HashMap<String, String>,
    }

    impl Fields for Obj {
        fn field(&self, path: &[String]) -> Option<String> {
            match path.first().map(String::as_str) {
                Some("name") => Some(self.name.to_string()),
                Some("labels") if !self.labels.is_empty() => self.labels.get(&path[1..].join(".")).cloned(),
                _ => None,
            }
        }
    }

    fn obj(name: &'static str, labels: &[(&str, &str)]) -> Obj {
        Obj {
            name,
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }
    }

    fn matches(filters: &[&str], o: &Obj) -> bool {
        FilterSet::parse_all(filters).unwrap().matches(o)
    }

    #[test]
    fn no_filter_matches_everything() {
        assert!(matches(&[], &obj("a", &[])));
        assert!(matches(&[""], &obj("a", &[])));
    }

    #[test]
    fn equality_presence_and_inequality() {
        let o = obj(
            "ns/1/sha256:ab",
            &[("containerd.io/snapshot.ref", "sha256:cd"), ("x", "1")],
        );
        assert!(matches(&["name==ns/1/sha256:ab"], &o));
        assert!(matches(&[r#"labels."containerd.io/snapshot.ref"==sha256:cd"#], &o));
        assert!(matches(&[r#"labels."containerd.io/snapshot.ref""#], &o));
        assert!(!matches(&["labels.missing"], &o));
        assert!(matches(&["labels.missing!=1"], &o));
        assert!(matches(&["labels.x!=2"], &o));
        assert!(!matches(&["labels.x!=1"], &o));
        assert!(matches(&[r#"name=="ns/1/sha256:ab",labels.x==1"#], &o));
        assert!(!matches(&["name==other,labels.x==1"], &o));
        assert!(matches(&["name==other", "labels.x==1"], &o));
    }

    #[test]
    fn dotted_label_path_joins_fields() {
        let o = obj("a", &[("a.b.c", "v")]);
        assert!(matches(&["labels.a.b.c==v"], &o));
    }

    #[test]
    fn regex_with_alternative_quotes() {
        let o = obj("extract-123 sha256:aa", &[]);
        assert!(matches(&["name~=/^extract-/"], &o));
        assert!(matches(&["name~=|sha256:a+$|"], &o));
        assert!(matches(&[r#"name~="^extract""#], &o));
        assert!(!matches(&["name~=^committed"], &o));
    }

    #[test]
    fn quoted_values_unescape() {
        let o = obj("a b,\"c\"", &[]);
        assert!(matches(&[r#"name=="a b,\"c\"""#], &o));
        assert!(matches(&[r#"name=="\x61 b,\u0022c\"""#], &o));
    }

    #[test]
    fn white_space_between_tokens() {
        let o = obj("a", &[("x", "1")]);
        assert!(matches(&[" name == a , labels.x == 1 "], &o));
    }

    #[test]
    fn errors_point_at_the_column() {
        let err = FilterSet::parse_all(&["name=a"]).unwrap_err();
        assert_eq!(err.column, 5);
        assert!(err.message.contains("operator"), "{err}");
        let err = FilterSet::parse_all(&["name==a,"]).unwrap_err();
        assert!(err.message.contains("field name"), "{err}");
        let err = FilterSet::parse_all(&["name==/x/"]).unwrap_err();
        assert!(err.message.contains("only allowed with ~="), "{err}");
        let err = FilterSet::parse_all(&[r#"labels."open"#]).unwrap_err();
        assert!(err.message.contains("unterminated"), "{err}");
        let err = FilterSet::parse_all(&["name~=/(/"]).unwrap_err();
        assert!(err.message.contains("regular expression"), "{err}");
        let err = FilterSet::parse_all(&["name== "]).unwrap_err();
        assert!(err.message.contains("expected a value"), "{err}");
        let err = FilterSet::parse_all(&["na-me"]).unwrap_err();
        assert_eq!(err.column, 3);
    }
}
