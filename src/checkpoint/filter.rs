//! The filter language of `checkpointctl list --filter`: comparisons such as
//! `label=prod`, `size>100MB` or `age<24h`, joined by `&&` and `||` (`&&`
//! binds tighter), grouped with parentheses and negated with `!`. Sizes and
//! durations are read by the base grammar of [`crate::units`], re-exported
//! here as [`parse_size`] and [`parse_duration`] for the flags that used them
//! from this module.
//!
//! This module owns parsing, the canonical printed form and evaluation. It
//! knows nothing of how checkpoints are stored: the caller presents each one
//! as a [`Subject`].
//!
//! It is not containerd's language (`snapshot::filter`), which is a flat
//! conjunction of `fieldpath op value` selectors (`==`, `!=`, `~=` regular
//! expressions, dotted field paths, Go-escaped strings and `/re/`), its
//! alternatives given as separate strings. This one has `&&`, `||`, `!` and
//! parentheses, ordering operators and `in` lists, typed size and duration
//! values, and quoted strings that escape only `"` and `\`. What the two
//! share is written once, there: [`FilterError`] and the character cursor
//! both parsers lex with.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::snapshot::filter::Cursor;
pub use crate::snapshot::filter::FilterError;
pub use crate::units::{parse_duration, parse_size};
use crate::units::{scan_duration, scan_size};

/// Parentheses and `!` nest through recursion (in the parser, in matching,
/// in printing and in drop), so their depth is capped to keep hostile input
/// from overflowing the stack; no hand-written filter comes near it.
const MAX_DEPTH: usize = 64;

const FIELDS: &str = "size, age, label or status";

/// A checkpoint as the filter sees it.
pub trait Subject {
    /// Bytes the checkpoint stores.
    fn size(&self) -> u64;
    /// Now minus the time the checkpoint was created.
    fn age(&self) -> Duration;
    /// Labels: key -> value ("" for a bare label).
    fn labels(&self) -> &BTreeMap<String, String>;
    fn status(&self) -> &str;
}

/// A parsed `--filter` expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    expr: Expr,
}

impl Filter {
    pub fn parse(input: &str) -> Result<Filter, FilterError> {
        let mut parser = Parser::new(input);
        let expr = parser.any_of()?;
        parser.cursor.skip_space();
        if let Some(next) = parser.cursor.peek() {
            let found = parser.found();
            let message = if next == ')' {
                format!("expected '&&', '||' or end of input, found {found} with no '(' to close")
            } else {
                format!("expected '&&', '||' or end of input, found {found}")
            };
            return Err(parser.cursor.error_at(parser.cursor.pos, message));
        }
        Ok(Filter { expr })
    }

    pub fn matches(&self, subject: &dyn Subject) -> bool {
        self.expr.matches(subject)
    }
}

impl FromStr for Filter {
    type Err = FilterError;

    fn from_str(input: &str) -> Result<Filter, FilterError> {
        Filter::parse(input)
    }
}

/// The canonical form: single spaces around `&&` and `||`, none inside a
/// comparison, parentheses only where needed, sizes in the largest unit that
/// divides them and durations as `1w2d3h4m5s`. It parses back to an equal
/// filter.
impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.expr.fmt(f)
    }
}

/// Invariant kept by the parser (and relied on by printing): `Or` and `And`
/// hold at least two terms, and a term is only of the same kind as its
/// parent when the input grouped it with parentheses.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expr {
    Or(Vec<Expr>),
    And(Vec<Expr>),
    Not(Box<Expr>),
    Compare(Comparison),
}

impl Expr {
    fn matches(&self, subject: &dyn Subject) -> bool {
        match self {
            Expr::Or(terms) => terms.iter().any(|term| term.matches(subject)),
            Expr::And(terms) => terms.iter().all(|term| term.matches(subject)),
            Expr::Not(inner) => !inner.matches(subject),
            Expr::Compare(comparison) => comparison.matches(subject),
        }
    }

    fn fmt_term(&self, f: &mut fmt::Formatter<'_>, parenthesize: bool) -> fmt::Result {
        if parenthesize {
            write!(f, "({self})")
        } else {
            write!(f, "{self}")
        }
    }
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Or(terms) => {
                for (i, term) in terms.iter().enumerate() {
                    if i > 0 {
                        f.write_str(" || ")?;
                    }
                    term.fmt_term(f, matches!(term, Expr::Or(_)))?;
                }
                Ok(())
            }
            Expr::And(terms) => {
                for (i, term) in terms.iter().enumerate() {
                    if i > 0 {
                        f.write_str(" && ")?;
                    }
                    term.fmt_term(f, matches!(term, Expr::Or(_) | Expr::And(_)))?;
                }
                Ok(())
            }
            Expr::Not(inner) => {
                f.write_str("!")?;
                inner.fmt_term(f, matches!(**inner, Expr::Or(_) | Expr::And(_)))
            }
            Expr::Compare(comparison) => comparison.fmt(f),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Size,
    Age,
    Label,
    Status,
}

impl Field {
    fn from_name(name: &str) -> Option<Field> {
        match name {
            "size" => Some(Field::Size),
            "age" => Some(Field::Age),
            "label" => Some(Field::Label),
            "status" => Some(Field::Status),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Field::Size => "size",
            Field::Age => "age",
            Field::Label => "label",
            Field::Status => "status",
        }
    }

    /// What a value of this field looks like, for "expected ..." messages.
    fn example(self) -> &'static str {
        match self {
            Field::Size => "a size such as 100MB",
            Field::Age => "a duration such as 24h",
            Field::Label => "a label such as prod or env=prod",
            Field::Status => "a status such as completed",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cmp {
    Eq,
    Ne,
    Gt,
    Lt,
    Ge,
    Le,
}

impl Cmp {
    fn symbol(self) -> &'static str {
        match self {
            Cmp::Eq => "=",
            Cmp::Ne => "!=",
            Cmp::Gt => ">",
            Cmp::Lt => "<",
            Cmp::Ge => ">=",
            Cmp::Le => "<=",
        }
    }

    fn holds<T: Ord>(self, actual: &T, expected: &T) -> bool {
        match self {
            Cmp::Eq => actual == expected,
            Cmp::Ne => actual != expected,
            Cmp::Gt => actual > expected,
            Cmp::Lt => actual < expected,
            Cmp::Ge => actual >= expected,
            Cmp::Le => actual <= expected,
        }
    }
}

/// A comparison on a number (`size`, `age`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Quantity {
    Compare(Cmp, u64),
    In(Vec<u64>),
}

impl Quantity {
    fn holds(&self, actual: u64) -> bool {
        match self {
            Quantity::Compare(cmp, expected) => cmp.holds(&actual, expected),
            Quantity::In(values) => values.contains(&actual),
        }
    }
}

/// A comparison on a word (`label`, `status`): these have no order, so the
/// ordering operators are not representable.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Word {
    Equal(String),
    NotEqual(String),
    In(Vec<String>),
}

impl Word {
    fn holds(&self, is: impl Fn(&str) -> bool) -> bool {
        match self {
            Word::Equal(value) => is(value),
            Word::NotEqual(value) => !is(value),
            Word::In(values) => values.iter().any(|value| is(value)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Comparison {
    Size(Quantity),
    /// Whole seconds: the duration grammar has no smaller unit.
    Age(Quantity),
    Label(Word),
    Status(Word),
}

impl Comparison {
    fn matches(&self, subject: &dyn Subject) -> bool {
        match self {
            Comparison::Size(quantity) => quantity.holds(subject.size()),
            Comparison::Age(quantity) => match quantity {
                // Compared as a Duration, not truncated to seconds, so that
                // `age>24h` holds a moment after the 24 hours are up.
                Quantity::Compare(cmp, secs) => cmp.holds(&subject.age(), &Duration::from_secs(*secs)),
                Quantity::In(values) => values.iter().any(|secs| subject.age() == Duration::from_secs(*secs)),
            },
            Comparison::Label(word) => word.holds(|value| has_label(subject.labels(), value)),
            Comparison::Status(word) => word.holds(|value| subject.status() == value),
        }
    }
}

/// `label=X` holds when X is a key, or when X is `k=v` and label k has value v.
fn has_label(labels: &BTreeMap<String, String>, wanted: &str) -> bool {
    if labels.contains_key(wanted) {
        return true;
    }
    match wanted.split_once('=') {
        Some((key, value)) => labels.get(key).is_some_and(|actual| actual == value),
        None => false,
    }
}

impl fmt::Display for Comparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Comparison::Size(quantity) => fmt_quantity(f, Field::Size, quantity, format_size),
            Comparison::Age(quantity) => fmt_quantity(f, Field::Age, quantity, format_duration),
            Comparison::Label(word) => fmt_word(f, Field::Label, word),
            Comparison::Status(word) => fmt_word(f, Field::Status, word),
        }
    }
}

fn fmt_quantity(
    f: &mut fmt::Formatter<'_>,
    field: Field,
    quantity: &Quantity,
    format: fn(u64) -> String,
) -> fmt::Result {
    let name = field.name();
    match quantity {
        Quantity::Compare(cmp, value) => write!(f, "{name}{}{}", cmp.symbol(), format(*value)),
        Quantity::In(values) => {
            let list: Vec<String> = values.iter().map(|value| format(*value)).collect();
            write!(f, "{name} in ({})", list.join(","))
        }
    }
}

fn fmt_word(f: &mut fmt::Formatter<'_>, field: Field, word: &Word) -> fmt::Result {
    let name = field.name();
    match word {
        Word::Equal(value) => write!(f, "{name}={}", quote_if_needed(value)),
        Word::NotEqual(value) => write!(f, "{name}!={}", quote_if_needed(value)),
        Word::In(values) => {
            let list: Vec<String> = values.iter().map(|value| quote_if_needed(value)).collect();
            write!(f, "{name} in ({})", list.join(","))
        }
    }
}

/// Characters of a bare (unquoted) value. `=` is one, so `label=env=prod`
/// needs no quotes.
fn is_bare(c: char) -> bool {
    !c.is_whitespace() && !matches!(c, '(' | ')' | ',' | '&' | '|' | '!' | '<' | '>')
}

fn quote_if_needed(value: &str) -> String {
    // A bare value may not start with `"` (that opens a quoted one) or `=`
    // (the parser takes `label==x` for a mistyped operator).
    let bare = value.chars().all(is_bare) && !value.is_empty() && !value.starts_with(['"', '=']);
    if bare {
        return value.to_owned();
    }
    let mut quoted = String::with_capacity(value.len() + 2);
    quoted.push('"');
    for c in value.chars() {
        if matches!(c, '"' | '\\') {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('"');
    quoted
}

/// Bytes in the largest unit that divides them exactly, so the text parses
/// back to the same number: 1610612736 -> 1536MB.
fn format_size(bytes: u64) -> String {
    for (shift, unit) in [(40, "TB"), (30, "GB"), (20, "MB"), (10, "KB")] {
        if bytes != 0 && bytes.is_multiple_of(1u64 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    format!("{bytes}B")
}

/// Seconds as `1w2d3h4m5s`, leaving out zero parts; `0s` for zero.
fn format_duration(secs: u64) -> String {
    let mut rest = secs;
    let mut text = String::new();
    for (unit_secs, unit) in [(604_800, 'w'), (86_400, 'd'), (3_600, 'h'), (60, 'm'), (1, 's')] {
        let count = rest / unit_secs;
        rest %= unit_secs;
        if count > 0 {
            text.push_str(&format!("{count}{unit}"));
        }
    }
    if text.is_empty() {
        text.push_str("0s");
    }
    text
}

enum Operator {
    Cmp(Cmp),
    In,
}

/// Recursive descent over characters, since what a token is depends on
/// where it stands: `=` ends a field name but belongs to a label value.
///
/// ```text
/// any_of     := all_of ('||' all_of)*
/// all_of     := unary ('&&' unary)*
/// unary      := '!' unary | '(' any_of ')' | comparison
/// comparison := field op value | field 'in' '(' value (',' value)* ')'
/// ```
struct Parser<'a> {
    cursor: Cursor<'a>,
    depth: usize,
}

impl<'a> Parser<'a> {
    fn new(input: &'a str) -> Self {
        Parser {
            cursor: Cursor::new(input),
            depth: 0,
        }
    }

    fn bare_word_len(&self, at: usize) -> usize {
        self.cursor.run_len(at, is_bare)
    }

    /// What stands at the current position, for "found ..." messages.
    fn found(&self) -> String {
        for two in ["&&", "||", "!=", ">=", "<="] {
            if self.cursor.looking_at(two) {
                return format!("'{two}'");
            }
        }
        match self.cursor.peek() {
            None => "end of input".to_owned(),
            Some(c) if !is_bare(c) => format!("{c:?}"),
            Some(_) => {
                let start = self.cursor.pos;
                let word = self.cursor.text(start, start + self.bare_word_len(start));
                format!("{word:?}")
            }
        }
    }

    fn any_of(&mut self) -> Result<Expr, FilterError> {
        let first = self.all_of()?;
        if !self.cursor.eat("||") {
            return Ok(first);
        }
        let mut terms = vec![first, self.all_of()?];
        while self.cursor.eat("||") {
            terms.push(self.all_of()?);
        }
        Ok(Expr::Or(terms))
    }

    fn all_of(&mut self) -> Result<Expr, FilterError> {
        let first = self.unary()?;
        if !self.cursor.eat("&&") {
            return Ok(first);
        }
        let mut terms = vec![first, self.unary()?];
        while self.cursor.eat("&&") {
            terms.push(self.unary()?);
        }
        Ok(Expr::And(terms))
    }

    fn enter(&mut self) -> Result<(), FilterError> {
        if self.depth == MAX_DEPTH {
            return Err(self.cursor.error_at(
                self.cursor.pos,
                format!("expected at most {MAX_DEPTH} levels of nested '(' and '!', found more"),
            ));
        }
        self.depth += 1;
        Ok(())
    }

    fn unary(&mut self) -> Result<Expr, FilterError> {
        self.cursor.skip_space();
        let start = self.cursor.pos;
        match self.cursor.peek() {
            Some('!') if !self.cursor.looking_at("!=") => {
                self.enter()?;
                self.cursor.pos += 1;
                let inner = self.unary()?;
                self.depth -= 1;
                Ok(Expr::Not(Box::new(inner)))
            }
            Some('(') => {
                self.enter()?;
                self.cursor.pos += 1;
                let inner = self.any_of()?;
                self.cursor.skip_space();
                if self.cursor.peek() != Some(')') {
                    let found = self.found();
                    let column = start + 1;
                    return Err(self.cursor.error_at(
                        self.cursor.pos,
                        format!("expected '&&', '||' or ')' to close the '(' at column {column}, found {found}"),
                    ));
                }
                self.cursor.pos += 1;
                self.depth -= 1;
                Ok(inner)
            }
            Some(c) if is_bare(c) && c != '=' => Ok(Expr::Compare(self.comparison()?)),
            _ => {
                let found = self.found();
                Err(self.cursor.error_at(
                    start,
                    format!("expected a comparison such as label=prod, found {found}"),
                ))
            }
        }
    }

    fn comparison(&mut self) -> Result<Comparison, FilterError> {
        let field_start = self.cursor.pos;
        let name = self.cursor.take_while(|c| is_bare(c) && c != '=');
        let field = Field::from_name(&name).ok_or_else(|| {
            self.cursor
                .error_at(field_start, format!("unknown field {name:?}: expected {FIELDS}"))
        })?;
        self.cursor.skip_space();
        let op_start = self.cursor.pos;
        let operator = self.operator()?;
        let textual = matches!(field, Field::Label | Field::Status);
        if let Operator::Cmp(cmp @ (Cmp::Gt | Cmp::Lt | Cmp::Ge | Cmp::Le)) = operator {
            if textual {
                return Err(self.cursor.error_at(
                    op_start,
                    format!(
                        "operator {} does not apply to {}; use =, != or in",
                        cmp.symbol(),
                        field.name()
                    ),
                ));
            }
        }
        let cmp = match operator {
            Operator::Cmp(cmp) => cmp,
            Operator::In => return self.list(field),
        };
        let after = format!("'{}'", cmp.symbol());
        Ok(match field {
            Field::Size => Comparison::Size(Quantity::Compare(cmp, self.number(field, &after)?)),
            Field::Age => Comparison::Age(Quantity::Compare(cmp, self.number(field, &after)?)),
            Field::Label | Field::Status => {
                let value = self.text(field, &after)?;
                let word = if cmp == Cmp::Eq {
                    Word::Equal(value)
                } else {
                    Word::NotEqual(value)
                };
                if field == Field::Label {
                    Comparison::Label(word)
                } else {
                    Comparison::Status(word)
                }
            }
        })
    }

    fn operator(&mut self) -> Result<Operator, FilterError> {
        for (text, cmp) in [
            ("!=", Cmp::Ne),
            (">=", Cmp::Ge),
            ("<=", Cmp::Le),
            ("=", Cmp::Eq),
            (">", Cmp::Gt),
            ("<", Cmp::Lt),
        ] {
            if self.cursor.looking_at(text) {
                self.cursor.pos += text.len();
                return Ok(Operator::Cmp(cmp));
            }
        }
        // `in` is a word: it must not run on into more word characters.
        let len = self.cursor.run_len(self.cursor.pos, |c| is_bare(c) && c != '=');
        if len == 2 && self.cursor.looking_at("in") {
            self.cursor.pos += 2;
            return Ok(Operator::In);
        }
        let found = self.found();
        Err(self.cursor.error_at(
            self.cursor.pos,
            format!("expected an operator (=, !=, >, <, >=, <= or in), found {found}"),
        ))
    }

    fn list(&mut self, field: Field) -> Result<Comparison, FilterError> {
        self.cursor.skip_space();
        if self.cursor.peek() != Some('(') {
            let found = self.found();
            return Err(self
                .cursor
                .error_at(self.cursor.pos, format!("expected '(' after 'in', found {found}")));
        }
        let open_column = self.cursor.pos + 1;
        self.cursor.pos += 1;
        let mut numbers = Vec::new();
        let mut texts = Vec::new();
        let mut after = "'('";
        loop {
            match field {
                Field::Size | Field::Age => numbers.push(self.number(field, after)?),
                Field::Label | Field::Status => texts.push(self.text(field, after)?),
            }
            self.cursor.skip_space();
            match self.cursor.peek() {
                Some(',') => {
                    self.cursor.pos += 1;
                    after = "','";
                }
                Some(')') => {
                    self.cursor.pos += 1;
                    break;
                }
                _ => {
                    let found = self.found();
                    return Err(self.cursor.error_at(
                        self.cursor.pos,
                        format!("expected ',' or ')' to close the list at column {open_column}, found {found}"),
                    ));
                }
            }
        }
        Ok(match field {
            Field::Size => Comparison::Size(Quantity::In(numbers)),
            Field::Age => Comparison::Age(Quantity::In(numbers)),
            Field::Label => Comparison::Label(Word::In(texts)),
            Field::Status => Comparison::Status(Word::In(texts)),
        })
    }

    /// The start of a value, or an error naming what was expected after
    /// `after` (the operator, `(` or `,`).
    fn value_start(&mut self, field: Field, after: &str) -> Result<usize, FilterError> {
        self.cursor.skip_space();
        match self.cursor.peek() {
            // `=` cannot start a bare value: `label==x` is far more likely a
            // mistyped operator than a label named "=x".
            Some(c) if is_bare(c) && c != '=' => Ok(self.cursor.pos),
            _ => {
                let found = self.found();
                Err(self.cursor.error_at(
                    self.cursor.pos,
                    format!("expected {} after {after}, found {found}", field.example()),
                ))
            }
        }
    }

    /// A size (in bytes) or an age (in seconds).
    fn number(&mut self, field: Field, after: &str) -> Result<u64, FilterError> {
        let start = self.value_start(field, after)?;
        self.cursor.pos += self.bare_word_len(start);
        let word = &self.cursor.chars[start..self.cursor.pos];
        let scanned = if field == Field::Size {
            scan_size(word)
        } else {
            scan_duration(word)
        };
        scanned.map_err(|e| self.cursor.error_at(start + e.offset, e.message))
    }

    /// A label or status: a bare word or a double-quoted string.
    fn text(&mut self, field: Field, after: &str) -> Result<String, FilterError> {
        let start = self.value_start(field, after)?;
        if self.cursor.peek() != Some('"') {
            return Ok(self.cursor.take_while(is_bare));
        }
        self.cursor.pos += 1;
        let mut value = String::new();
        loop {
            match self.cursor.peek() {
                None => {
                    let column = start + 1;
                    return Err(self.cursor.error_at(
                        self.cursor.pos,
                        format!("expected '\"' to close the quote at column {column}, found end of input"),
                    ));
                }
                Some('"') => {
                    self.cursor.pos += 1;
                    return Ok(value);
                }
                Some('\\') => {
                    self.cursor.pos += 1;
                    match self.cursor.peek() {
                        Some(c @ ('"' | '\\')) => value.push(c),
                        _ => {
                            let found = self.found();
                            return Err(self.cursor.error_at(
                                self.cursor.pos,
                                format!("expected '\"' or '\\' after '\\' in a quoted value, found {found}"),
                            ));
                        }
                    }
                    self.cursor.pos += 1;
                }
                Some(c) => {
                    value.push(c);
                    self.cursor.pos += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{Classify, ErrorKind};

    struct Checkpoint {
        size: u64,
        age: Duration,
        labels: BTreeMap<String, String>,
        status: String,
    }

    impl Subject for Checkpoint {
        fn size(&self) -> u64 {
            self.size
        }
        fn age(&self) -> Duration {
            self.age
        }
        fn labels(&self) -> &BTreeMap<String, String> {
            &self.labels
        }
        fn status(&self) -> &str {
            &self.status
        }
    }

    /// `labels` as `key=value` or bare `key`.
    fn checkpoint(size: u64, age_secs: u64, labels: &[&str], status: &str) -> Checkpoint {
        Checkpoint {
            size,
            age: Duration::from_secs(age_secs),
            labels: labels
                .iter()
                .map(|label| match label.split_once('=') {
                    Some((key, value)) => (key.to_owned(), value.to_owned()),
                    None => (label.to_string(), String::new()),
                })
                .collect(),
            status: status.to_owned(),
        }
    }

    fn labelled(labels: &[&str]) -> Checkpoint {
        checkpoint(0, 0, labels, "completed")
    }

    fn holds(filter: &str, subject: &Checkpoint) -> bool {
        Filter::parse(filter).unwrap_or_else(|e| panic!("{e}")).matches(subject)
    }

    const HOUR: u64 = 3600;
    const MB: u64 = 1 << 20;

    #[test]
    fn the_documented_examples() {
        let young_prod = checkpoint(10 * MB, 2 * HOUR, &["prod"], "completed");
        let old_prod = checkpoint(10 * MB, 30 * HOUR, &["prod"], "completed");
        let young_dev = checkpoint(10 * MB, 2 * HOUR, &["env=dev"], "completed");
        assert!(holds("label=prod && age<24h", &young_prod));
        assert!(!holds("label=prod && age<24h", &old_prod));
        assert!(!holds("label=prod && age<24h", &young_dev));

        let big = checkpoint(200 * MB, 0, &[], "completed");
        let critical = checkpoint(MB, 0, &["critical"], "completed");
        let neither = checkpoint(100 * MB, 0, &["boring"], "completed");
        assert!(holds("size>100MB || label=critical", &big));
        assert!(holds("size>100MB || label=critical", &critical));
        assert!(!holds("size>100MB || label=critical", &neither));

        let filter = "label in (prod,staging) && age<48h";
        assert!(holds(filter, &checkpoint(0, 47 * HOUR, &["staging"], "completed")));
        assert!(holds(filter, &checkpoint(0, 47 * HOUR, &["prod", "x=y"], "completed")));
        assert!(!holds(filter, &checkpoint(0, 48 * HOUR, &["prod"], "completed")));
        assert!(!holds(filter, &checkpoint(0, HOUR, &["dev"], "completed")));

        assert!(holds("label=golden", &labelled(&["golden"])));
        assert!(holds("label=golden", &labelled(&["golden=yes"])));
        assert!(!holds("label=golden", &labelled(&["gold"])));
    }

    #[test]
    fn labels_match_by_key_or_key_and_value() {
        let subject = labelled(&["env=prod", "tier=", "golden"]);
        assert!(holds("label=env", &subject));
        assert!(holds("label=env=prod", &subject));
        assert!(!holds("label=env=dev", &subject));
        assert!(holds("label=tier=", &subject), "an empty value is a value");
        assert!(holds("label=golden=", &subject), "a bare label has an empty value");
        assert!(!holds("label=golden=x", &subject));
        assert!(holds("label!=env=dev", &subject));
        assert!(!holds("label!=env", &subject));
        assert!(holds("label in (env=dev, env=prod)", &subject));
        assert!(!holds("label in (env=dev,missing)", &subject));
        assert!(holds(
            r#"label="a b" || label="say \"hi\"""#,
            &labelled(&["say \"hi\""])
        ));
        assert!(holds(r#"label="a b=c d""#, &labelled(&["a b=c d"])));
        assert!(holds(r#"label="back\\slash""#, &labelled(&["back\\slash"])));
    }

    #[test]
    fn status_compares_exactly() {
        let subject = checkpoint(0, 0, &[], "completed");
        assert!(holds("status=completed", &subject));
        assert!(!holds("status=Completed", &subject));
        assert!(!holds("status=complete", &subject));
        assert!(holds("status!=failed", &subject));
        assert!(holds("status in (failed,completed)", &subject));
        assert!(!holds("status in (failed)", &subject));
    }

    #[test]
    fn sizes_and_ages_take_every_operator() {
        let subject = checkpoint(100 * MB, 90, &[], "completed");
        for (filter, expected) in [
            ("size=100MB", true),
            ("size=104857600", true),
            ("size!=100MB", false),
            ("size>100MB", false),
            ("size>=100MB", true),
            ("size<100MB", false),
            ("size<=100MB", true),
            ("size<0.1GB", true),
            ("size in (1GB, 100MiB)", true),
            ("size in (1GB,99MB)", false),
            ("age=90s", true),
            ("age=1m30s", true),
            ("age!=90s", false),
            ("age>1m", true),
            ("age<1m", false),
            ("age>=90s", true),
            ("age<=89s", false),
            ("age in (1h,90s)", true),
            ("age in (1h)", false),
        ] {
            assert_eq!(holds(filter, &subject), expected, "{filter}");
        }
        // Compared at full precision: just past a day is older than a day.
        let just_over = Checkpoint {
            age: Duration::from_secs(24 * HOUR) + Duration::from_millis(1),
            ..checkpoint(0, 0, &[], "completed")
        };
        assert!(holds("age>24h", &just_over));
        assert!(!holds("age=24h", &just_over));
    }

    #[test]
    fn and_binds_tighter_than_or() {
        let filter = Filter::parse("label=a || label=b && label=c").unwrap();
        assert_eq!(filter, Filter::parse("label=a || (label=b && label=c)").unwrap());
        assert_ne!(filter, Filter::parse("(label=a || label=b) && label=c").unwrap());
        assert!(filter.matches(&labelled(&["a"])));
        assert!(!filter.matches(&labelled(&["b"])));
        assert!(filter.matches(&labelled(&["b", "c"])));
        assert_eq!(filter.to_string(), "label=a || label=b && label=c");

        let filter = Filter::parse("label=a && label=b || label=c").unwrap();
        assert!(filter.matches(&labelled(&["c"])));
        assert!(!filter.matches(&labelled(&["a"])));
    }

    #[test]
    fn parentheses_group() {
        let filter = Filter::parse("(label=a || label=b) && label=c").unwrap();
        assert!(!filter.matches(&labelled(&["a"])));
        assert!(filter.matches(&labelled(&["a", "c"])));
        assert!(filter.matches(&labelled(&["b", "c"])));
        assert_eq!(filter.to_string(), "(label=a || label=b) && label=c");
        assert_eq!(Filter::parse("((label=a))").unwrap(), Filter::parse("label=a").unwrap());
    }

    #[test]
    fn negation() {
        let subject = labelled(&["a"]);
        assert!(!holds("!label=a", &subject));
        assert!(holds("! label=b", &subject));
        assert!(holds("!!label=a", &subject));
        assert!(!holds("!(label=a || label=b)", &subject));
        assert!(holds("!(label=a && label=b)", &subject));
        assert!(holds("!label=b && label=a", &subject), "! applies to one comparison");
        assert_eq!(
            Filter::parse("!(label=a||label=b)").unwrap().to_string(),
            "!(label=a || label=b)"
        );
    }

    #[test]
    fn white_space_is_optional_around_symbols() {
        let tight = Filter::parse("label=a&&size>=1GB||(age<=1h)&&!status!=x||label in(b,c)").unwrap();
        let loose =
            Filter::parse("  label = a && size >= 1GB || ( age <= 1h ) && ! status != x || label in ( b , c )  ")
                .unwrap();
        assert_eq!(tight, loose);
        assert_eq!(
            tight.to_string(),
            "label=a && size>=1GB || age<=1h && !status!=x || label in (b,c)"
        );
    }

    #[test]
    fn canonical_form() {
        for (input, canonical) in [
            ("size>1.5GB", "size>1536MB"),
            ("size>1.5gib", "size>1536MB"),
            ("size<=512", "size<=512B"),
            ("size=0", "size=0B"),
            ("size=1024MB", "size=1GB"),
            ("size in ( 10kb ,2TiB)", "size in (10KB,2TB)"),
            ("age<90s", "age<1m30s"),
            ("age<168h", "age<1w"),
            ("age>0s", "age>0s"),
            ("label=env=prod", "label=env=prod"),
            (r#"label="prod""#, "label=prod"),
            (r#"label="a b""#, r#"label="a b""#),
            (r#"label="=x""#, r#"label="=x""#),
            (r#"label="""#, r#"label="""#),
            (r#"label=a"b"#, r#"label=a"b"#),
            (r#"label="\"a""#, r#"label="\"a""#),
            ("status in (x,\"y,z\")", "status in (x,\"y,z\")"),
        ] {
            let filter = Filter::parse(input).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(filter.to_string(), canonical, "{input}");
            assert_eq!(Filter::parse(canonical).unwrap(), filter, "{input}");
        }
    }

    #[test]
    fn from_str_parses() {
        let filter: Filter = "label=a".parse().unwrap();
        assert_eq!(filter, Filter::parse("label=a").unwrap());
        assert!("label=".parse::<Filter>().is_err());
    }

    #[test]
    fn error_display_names_input_message_and_column() {
        let err = Filter::parse("size>>1").unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"filter "size>>1": expected a size such as 100MB after '>', found '>' at column 6"#
        );
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    }

    #[test]
    fn errors_point_at_the_problem() {
        let deep = format!("{}label=a{}", "(".repeat(100), ")".repeat(100));
        let cases: &[(&str, usize, &str)] = &[
            ("", 1, "expected a comparison such as label=prod, found end of input"),
            ("   ", 4, "expected a comparison such as label=prod, found end of input"),
            ("size>>1", 6, "expected a size such as 100MB after '>', found '>'"),
            (
                "size>",
                6,
                "expected a size such as 100MB after '>', found end of input",
            ),
            (
                "label=",
                7,
                "expected a label such as prod or env=prod after '=', found end of input",
            ),
            ("label==a", 7, "after '=', found \"=a\""),
            (
                "(label=a",
                9,
                "expected '&&', '||' or ')' to close the '(' at column 1, found end of input",
            ),
            ("((label=a)", 11, "to close the '(' at column 1, found end of input"),
            ("(label=a b)", 10, "to close the '(' at column 1, found \"b\""),
            (
                "label=a)",
                8,
                "expected '&&', '||' or end of input, found ')' with no '(' to close",
            ),
            ("()", 2, "expected a comparison such as label=prod, found ')'"),
            ("label=a b", 9, "expected '&&', '||' or end of input, found \"b\""),
            ("label=a & label=b", 9, "expected '&&', '||' or end of input, found '&'"),
            (
                "label=a &&",
                11,
                "expected a comparison such as label=prod, found end of input",
            ),
            ("label=a || && label=b", 12, "found '&&'"),
            ("label=a!b", 8, "found '!'"),
            (
                "size>10XB",
                8,
                "expected a unit B, KB, MB, GB or TB (or KiB, MiB, GiB, TiB), found \"XB\"",
            ),
            ("size>1.GB", 8, "expected a digit after '.', found \"GB\""),
            ("size>1.5", 6, "expected a whole number of bytes, found \"1.5\""),
            ("size>MB", 6, "expected a size such as 100MB, found \"MB\""),
            (
                "size>99999999TB",
                6,
                "expected a size of at most 18446744073709551615 bytes (16EiB)",
            ),
            (
                "size>\"1GB\"",
                6,
                "expected a size such as 100MB, found \"\\\"1GB\\\"\"",
            ),
            (
                "age<24",
                7,
                "expected a unit (w, d, h, m or s) after 24, found end of input",
            ),
            ("age<1x", 6, "expected a unit (w, d, h, m or s) after 1, found \"x\""),
            (
                "age<30m1h",
                9,
                "expected units from largest to smallest, each at most once, found \"h\" after \"m\"",
            ),
            ("age<1h1h", 8, "found \"h\" after \"h\""),
            ("age<1.5h", 6, "write 1h30m rather than 1.5h"),
            ("age<h", 5, "expected a duration such as 24h or 1h30m, found \"h\""),
            (
                "age<99999999999999999999s",
                5,
                "expected a duration of at most 18446744073709551615s",
            ),
            ("foo=1", 1, "unknown field \"foo\": expected size, age, label or status"),
            ("size>1 && labels=a", 11, "unknown field \"labels\""),
            ("label>a", 6, "operator > does not apply to label; use =, != or in"),
            ("status<=x", 7, "operator <= does not apply to status; use =, != or in"),
            (
                "label",
                6,
                "expected an operator (=, !=, >, <, >=, <= or in), found end of input",
            ),
            (
                "label ~ a",
                7,
                "expected an operator (=, !=, >, <, >=, <= or in), found \"~\"",
            ),
            ("label inn (a)", 7, "found \"inn\""),
            ("label in prod", 10, "expected '(' after 'in', found \"prod\""),
            (
                "label in ()",
                11,
                "expected a label such as prod or env=prod after '(', found ')'",
            ),
            ("label in (a,)", 13, "after ',', found ')'"),
            (
                "label in (a b)",
                13,
                "expected ',' or ')' to close the list at column 10, found \"b\"",
            ),
            ("label in (a", 12, "to close the list at column 10, found end of input"),
            ("size in (1GB,x)", 14, "expected a size such as 100MB, found \"x\""),
            (
                "label=\"abc",
                11,
                "expected '\"' to close the quote at column 7, found end of input",
            ),
            (
                "label=\"a\\nb\"",
                10,
                "expected '\"' or '\\' after '\\' in a quoted value, found \"nb",
            ),
            ("label=\"a\"b", 10, "found \"b\""),
            ("!", 2, "found end of input"),
            ("!=a", 1, "found '!='"),
            ("é=1", 1, "unknown field \"é\""),
            ("label=é x", 9, "found \"x\""),
            (
                &deep,
                65,
                "expected at most 64 levels of nested '(' and '!', found more",
            ),
        ];
        for (input, column, message) in cases {
            let err = Filter::parse(input).expect_err(input);
            assert_eq!(err.input, *input);
            assert!(
                err.message.contains(message),
                "{input:?}: message {:?} lacks {message:?}",
                err.message
            );
            assert_eq!(err.column, *column, "{input:?}: {err}");
        }
        let nested_not = format!("{}label=a", "!".repeat(64));
        assert!(Filter::parse(&nested_not).is_ok());
        let too_deep = format!("{}label=a", "!".repeat(65));
        assert_eq!(Filter::parse(&too_deep).unwrap_err().column, 65);
    }

    /// xorshift64*: deterministic, so a failure reproduces from its seed.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn pick<T: Copy>(&mut self, items: &[T]) -> T {
            items[self.below(items.len())]
        }

        fn chance(&mut self, one_in: usize) -> bool {
            self.below(one_in) == 0
        }
    }

    #[rustfmt::skip]
    const TOKENS: &[&str] = &[
        "size", "age", "label", "status", "in", "foo", "=", "==", "!=", ">", "<", ">=", "<=", "!", "(", ")", ",",
        "&&", "||", "&", "|", "\"", "\\", "\\\"", " ", "  ", "\t", "\n", "0", "1", "9", "42", "1.5", ".", "-",
        "99999999999999999999", "B", "KB", "MiB", "gb", "TB", "XB", "h", "m", "s", "d", "w", "1h30m", "24h", "prod",
        "env=prod", "a b", "\u{0}", "\u{7f}", "é", "日本", "🦀", "\u{a0}", "\u{2028}", "\u{301}", "~",
    ];

    fn check_outcome(input: &str) {
        match Filter::parse(input) {
            Ok(filter) => {
                // Whatever parses must also survive its own printing.
                let printed = filter.to_string();
                let reparsed =
                    Filter::parse(&printed).unwrap_or_else(|e| panic!("{input:?} printed as {printed:?}: {e}"));
                assert_eq!(reparsed, filter, "{input:?} printed as {printed:?}");
            }
            Err(err) => {
                let limit = input.chars().count() + 1;
                assert!(
                    (1..=limit).contains(&err.column),
                    "{input:?}: column {} outside 1..={limit}: {err}",
                    err.column
                );
                assert_eq!(err.input, input);
                assert!(!err.message.is_empty());
            }
        }
    }

    #[test]
    fn fuzz_random_token_strings_never_panic() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..20_000 {
            let mut input = String::new();
            for _ in 0..rng.below(14) {
                input.push_str(rng.pick(TOKENS));
            }
            check_outcome(&input);
        }
    }

    #[test]
    fn fuzz_mutated_valid_filters_never_panic() {
        let mut rng = Rng(0xdead_beef_cafe_f00d);
        for _ in 0..5_000 {
            let mut chars: Vec<char> = random_expr(&mut rng, 3).to_string().chars().collect();
            for _ in 0..1 + rng.below(3) {
                let at = rng.below(chars.len() + 1);
                match rng.below(3) {
                    0 if at < chars.len() => {
                        chars.remove(at);
                    }
                    1 if at < chars.len() => chars.truncate(at),
                    _ => {
                        let tail = chars.split_off(at);
                        chars.extend(rng.pick(TOKENS).chars());
                        chars.extend(tail);
                    }
                }
            }
            check_outcome(&chars.iter().collect::<String>());
        }
    }

    #[rustfmt::skip]
    const WORDS: &[&str] = &[
        "prod", "staging", "env=prod", "env=", "a", "in", "&&", "x y", "\"q\"", "back\\slash", "=lead", "", "é", "日本",
        "(p)", "a,b", "!", "<>", "tab\there", "\u{a0}",
    ];

    fn random_size(rng: &mut Rng) -> u64 {
        match rng.below(5) {
            0 => rng.pick(&[0, 1, 512, 1023, 1024, 1536, 100 << 20, 3 << 29, 1 << 40, u64::MAX]),
            1 => rng.next(),
            2 => (rng.next() % 1000) << (10 * rng.below(5)),
            _ => rng.next() % 10_000,
        }
    }

    fn random_secs(rng: &mut Rng) -> u64 {
        match rng.below(4) {
            0 => rng.pick(&[0, 1, 59, 60, 90, 3600, 5400, 86_400, 604_800, u64::MAX]),
            1 => rng.next(),
            _ => rng.next() % 200_000,
        }
    }

    fn random_quantity(rng: &mut Rng, value: fn(&mut Rng) -> u64) -> Quantity {
        if rng.chance(4) {
            let count = 1 + rng.below(3);
            Quantity::In((0..count).map(|_| value(rng)).collect())
        } else {
            let cmp = rng.pick(&[Cmp::Eq, Cmp::Ne, Cmp::Gt, Cmp::Lt, Cmp::Ge, Cmp::Le]);
            Quantity::Compare(cmp, value(rng))
        }
    }

    fn random_word(rng: &mut Rng) -> Word {
        let word = |rng: &mut Rng| rng.pick(WORDS).to_string();
        match rng.below(3) {
            0 => Word::Equal(word(rng)),
            1 => Word::NotEqual(word(rng)),
            _ => {
                let count = 1 + rng.below(3);
                Word::In((0..count).map(|_| word(rng)).collect())
            }
        }
    }

    fn random_comparison(rng: &mut Rng) -> Comparison {
        match rng.below(4) {
            0 => Comparison::Size(random_quantity(rng, random_size)),
            1 => Comparison::Age(random_quantity(rng, random_secs)),
            2 => Comparison::Label(random_word(rng)),
            _ => Comparison::Status(random_word(rng)),
        }
    }

    fn random_expr(rng: &mut Rng, depth: usize) -> Expr {
        if depth == 0 || rng.chance(3) {
            return Expr::Compare(random_comparison(rng));
        }
        match rng.below(3) {
            0 => Expr::Not(Box::new(random_expr(rng, depth - 1))),
            kind => {
                let terms = (0..2 + rng.below(3)).map(|_| random_expr(rng, depth - 1)).collect();
                if kind == 1 {
                    Expr::Or(terms)
                } else {
                    Expr::And(terms)
                }
            }
        }
    }

    fn random_subject(rng: &mut Rng) -> Checkpoint {
        let labels: Vec<&str> = (0..rng.below(4)).map(|_| rng.pick(WORDS)).collect();
        Checkpoint {
            age: Duration::from_secs(random_secs(rng)) + Duration::from_millis(rng.next() % 2 * 500),
            ..checkpoint(random_size(rng), 0, &labels, rng.pick(WORDS))
        }
    }

    #[test]
    fn fuzz_printed_filters_parse_back_equal() {
        let mut rng = Rng(0x0123_4567_89ab_cdef);
        let subjects: Vec<Checkpoint> = (0..16).map(|_| random_subject(&mut rng)).collect();
        for _ in 0..3_000 {
            let filter = Filter {
                expr: random_expr(&mut rng, 4),
            };
            let printed = filter.to_string();
            let parsed = Filter::parse(&printed).unwrap_or_else(|e| panic!("{filter:?} printed as {printed:?}: {e}"));
            assert_eq!(parsed, filter, "printed as {printed:?}");
            for subject in &subjects {
                assert_eq!(parsed.matches(subject), filter.matches(subject), "{printed}");
            }
        }
    }
}
