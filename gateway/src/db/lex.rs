//! A small SQL lexer: just enough to never touch text inside literals, quoted identifiers or
//! comments. Used to refuse transaction control and by the deterministic rewrite
//! (`command::rewrite`).

/// The keyword if `sql` starts with a transaction-control statement.
pub fn transaction_control_keyword(sql: &str) -> Option<String> {
    let first = tokenize(sql)
        .into_iter()
        .find(|t| !matches!(t.kind, TokKind::Space | TokKind::Comment))?;
    let word = first.text(sql).to_ascii_uppercase();
    matches!(
        word.as_str(),
        "BEGIN" | "COMMIT" | "END" | "ROLLBACK" | "SAVEPOINT" | "RELEASE"
    )
    .then_some(word)
}

/// The words of `sql` outside string literals, quoted identifiers and comments, uppercased.
pub fn significant_words(sql: &str) -> Vec<String> {
    tokenize(sql)
        .into_iter()
        .filter(|t| t.kind == TokKind::Word)
        .map(|t| t.text(sql).to_ascii_uppercase())
        .collect()
}

/// Every token of `sql` except spaces and comments, as written.
pub fn significant_tokens(sql: &str) -> Vec<&str> {
    tokenize(sql)
        .into_iter()
        .filter(|t| !matches!(t.kind, TokKind::Space | TokKind::Comment))
        .map(|t| t.text(sql))
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TokKind {
    Word,
    /// `'...'` string literal.
    Str,
    /// `"..."`, `` `...` ``, `[...]` quoted identifiers.
    QuotedIdent,
    Space,
    Comment,
    Punct,
}

#[derive(Debug, Clone, Copy)]
pub struct Tok {
    pub kind: TokKind,
    pub start: usize,
    pub end: usize,
}

impl Tok {
    pub fn text<'a>(&self, s: &'a str) -> &'a str {
        &s[self.start..self.end]
    }
}

/// A small SQL lexer: just enough to never touch text inside literals, identifiers or comments.
pub fn tokenize(s: &str) -> Vec<Tok> {
    let b = s.as_bytes();
    let mut toks = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let start = i;
        let c = b[i];
        let kind = if c.is_ascii_whitespace() {
            while i < b.len() && b[i].is_ascii_whitespace() {
                i += 1;
            }
            TokKind::Space
        } else if c == b'-' && b.get(i + 1) == Some(&b'-') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
            TokKind::Comment
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            i += 2;
            while i < b.len() && !(b[i] == b'*' && b.get(i + 1) == Some(&b'/')) {
                i += 1;
            }
            i = (i + 2).min(b.len());
            TokKind::Comment
        } else if c == b'\'' || c == b'"' || c == b'`' || c == b'[' {
            let close = if c == b'[' { b']' } else { c };
            i += 1;
            loop {
                if i >= b.len() {
                    break;
                }
                if b[i] == close {
                    // A doubled quote is an escaped quote.
                    if close != b']' && b.get(i + 1) == Some(&close) {
                        i += 2;
                        continue;
                    }
                    i += 1;
                    break;
                }
                i += 1;
            }
            if c == b'\'' {
                TokKind::Str
            } else {
                TokKind::QuotedIdent
            }
        } else if c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80 {
            while i < b.len()
                && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] >= 0x80 || b[i] == b'$')
            {
                i += 1;
            }
            TokKind::Word
        } else {
            i += 1;
            TokKind::Punct
        };
        toks.push(Tok {
            kind,
            start,
            end: i,
        });
    }
    toks
}
