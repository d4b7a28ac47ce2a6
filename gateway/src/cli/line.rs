//! The shell's line input: on a terminal, a small line editor (raw mode through termios) with
//! history, like the rqlite shell's: Up/Down (Ctrl-P/Ctrl-N) walk earlier lines, Left/Right,
//! Home/End (Ctrl-A/Ctrl-E), Backspace, Delete, Ctrl-U (clear), Ctrl-C (drop the line), Ctrl-D
//! (leave on an empty line). History lives in `~/.cairn_history` (`CAIRN_HISTFILE` names
//! another file), at most [`HISTORY_MAX`] lines, the newest last, as rqlite keeps
//! `~/.rqlite_history`. Input that is not a terminal is read line by line, without history.

use std::io::{BufRead, Read, Write};
use std::os::fd::AsRawFd;
use std::path::PathBuf;

/// Lines of history kept (rqlite's shell keeps 100 by default).
pub const HISTORY_MAX: usize = 100;

/// Lines typed, oldest first, and the file they are kept in.
pub struct History {
    lines: Vec<String>,
    file: Option<PathBuf>,
}

impl History {
    /// The history of `~/.cairn_history` (or `CAIRN_HISTFILE`); empty when there is none.
    pub fn load() -> History {
        let file = std::env::var_os("CAIRN_HISTFILE")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cairn_history")));
        let lines = file
            .as_ref()
            .and_then(|f| std::fs::read_to_string(f).ok())
            .map(|t| t.lines().map(str::to_string).collect())
            .unwrap_or_default();
        History { lines, file }
    }

    /// Adds a line (not a repeat of the last one, nor a blank one) and saves the file.
    pub fn push(&mut self, line: &str) {
        if line.trim().is_empty() || self.lines.last().is_some_and(|l| l == line) {
            return;
        }
        self.lines.push(line.to_string());
        if self.lines.len() > HISTORY_MAX {
            self.lines.drain(..self.lines.len() - HISTORY_MAX);
        }
        if let Some(f) = &self.file {
            let mut text = self.lines.join("\n");
            text.push('\n');
            // Losing history is no reason to stop the shell.
            let _ = std::fs::write(f, text);
        }
    }

    pub fn lines(&self) -> &[String] {
        &self.lines
    }
}

/// What one read gave.
pub enum Input {
    Line(String),
    /// Ctrl-D on an empty line, or the end of the input.
    Eof,
}

/// Reads lines from stdin: edited with history on a terminal, plain otherwise.
pub struct Reader {
    pub history: History,
    tty: bool,
}

impl Reader {
    pub fn new() -> Reader {
        // SAFETY: isatty only inspects the descriptor.
        let tty = unsafe { libc::isatty(std::io::stdin().as_raw_fd()) } == 1;
        Reader {
            history: History::load(),
            tty,
        }
    }

    /// Shows `prompt` and reads one line.
    pub fn read(&mut self, prompt: &str) -> std::io::Result<Input> {
        let mut out = std::io::stdout();
        if !self.tty {
            write!(out, "{prompt}")?;
            out.flush()?;
            let mut line = String::new();
            if std::io::stdin().lock().read_line(&mut line)? == 0 {
                return Ok(Input::Eof);
            }
            return Ok(Input::Line(line.trim_end_matches(['\n', '\r']).to_string()));
        }
        // Raw before the prompt shows: what is typed after it is never echoed twice or lost.
        let raw = RawMode::enter()?;
        write!(out, "{prompt}")?;
        out.flush()?;
        let r = self.edit(prompt, &mut out);
        drop(raw);
        writeln!(out)?;
        if let Ok(Input::Line(l)) = &r {
            self.history.push(l);
        }
        r
    }

    fn edit(&self, prompt: &str, out: &mut std::io::Stdout) -> std::io::Result<Input> {
        let mut stdin = std::io::stdin().lock();
        let mut buf: Vec<char> = Vec::new();
        let mut pos = 0usize;
        // Index into history while walking it; `lines.len()` is the line being typed.
        let hist = self.history.lines();
        let mut at = hist.len();
        let mut typed: Vec<char> = Vec::new();
        let redraw = |out: &mut std::io::Stdout, buf: &[char], pos: usize| {
            let text: String = buf.iter().collect();
            write!(out, "\r{prompt}{text}\x1b[K")?;
            let back = buf.len() - pos;
            if back > 0 {
                write!(out, "\x1b[{back}D")?;
            }
            out.flush()
        };
        loop {
            let Some(c) = read_char(&mut stdin)? else {
                return Ok(if buf.is_empty() {
                    Input::Eof
                } else {
                    Input::Line(buf.iter().collect())
                });
            };
            match c {
                '\r' | '\n' => return Ok(Input::Line(buf.iter().collect())),
                '\u{4}' if buf.is_empty() => return Ok(Input::Eof),
                '\u{4}' if pos < buf.len() => {
                    buf.remove(pos);
                }
                '\u{3}' => {
                    // Ctrl-C: drop the line, a fresh prompt.
                    write!(out, "^C\r\n")?;
                    buf.clear();
                    pos = 0;
                    at = hist.len();
                }
                '\u{7f}' | '\u{8}' if pos > 0 => {
                    pos -= 1;
                    buf.remove(pos);
                }
                '\u{1}' => pos = 0,
                '\u{5}' => pos = buf.len(),
                '\u{15}' => {
                    buf.clear();
                    pos = 0;
                }
                '\u{10}' | '\u{e}' => {
                    step(&mut at, c == '\u{10}', hist, &mut buf, &mut typed);
                    pos = buf.len();
                }
                '\u{1b}' => {
                    // CSI sequences: arrows, Home, End, Delete.
                    let (Some(a), Some(b)) = (read_char(&mut stdin)?, read_char(&mut stdin)?)
                    else {
                        continue;
                    };
                    match (a, b) {
                        ('[' | 'O', 'A') | ('[' | 'O', 'B') => {
                            step(&mut at, b == 'A', hist, &mut buf, &mut typed);
                            pos = buf.len();
                        }
                        ('[' | 'O', 'C') => pos = (pos + 1).min(buf.len()),
                        ('[' | 'O', 'D') => pos = pos.saturating_sub(1),
                        ('[' | 'O', 'H') => pos = 0,
                        ('[' | 'O', 'F') => pos = buf.len(),
                        ('[', d) if d.is_ascii_digit() => {
                            // `ESC [ n ~`: 1/7 Home, 4/8 End, 3 Delete.
                            let _ = read_char(&mut stdin)?;
                            match d {
                                '1' | '7' => pos = 0,
                                '4' | '8' => pos = buf.len(),
                                '3' if pos < buf.len() => {
                                    buf.remove(pos);
                                }
                                _ => {}
                            }
                        }
                        _ => {}
                    }
                }
                c if !c.is_control() => {
                    buf.insert(pos, c);
                    pos += 1;
                    if pos == buf.len() {
                        // Typed at the end: the character is all that changes.
                        write!(out, "{c}")?;
                        out.flush()?;
                        continue;
                    }
                }
                _ => {}
            }
            redraw(out, &buf, pos)?;
        }
    }
}

/// Moves through history: `up` to older lines, else newer; the line being typed is kept.
fn step(at: &mut usize, up: bool, hist: &[String], buf: &mut Vec<char>, typed: &mut Vec<char>) {
    if up && *at > 0 {
        if *at == hist.len() {
            *typed = buf.clone();
        }
        *at -= 1;
        *buf = hist[*at].chars().collect();
    } else if !up && *at < hist.len() {
        *at += 1;
        *buf = if *at == hist.len() {
            typed.clone()
        } else {
            hist[*at].chars().collect()
        };
    }
}

/// One UTF-8 character from `input`; `None` at its end.
fn read_char(input: &mut impl Read) -> std::io::Result<Option<char>> {
    let mut b = [0u8; 4];
    if input.read(&mut b[..1])? == 0 {
        return Ok(None);
    }
    let len = match b[0] {
        0x00..=0x7f => 1,
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        0xf0..=0xf7 => 4,
        _ => return Ok(Some(char::REPLACEMENT_CHARACTER)),
    };
    if len > 1 {
        input.read_exact(&mut b[1..len])?;
    }
    Ok(Some(
        std::str::from_utf8(&b[..len])
            .ok()
            .and_then(|s| s.chars().next())
            .unwrap_or(char::REPLACEMENT_CHARACTER),
    ))
}

/// The terminal in raw mode (no echo, no line buffering, no signals) until dropped.
struct RawMode {
    fd: i32,
    saved: libc::termios,
}

impl RawMode {
    fn enter() -> std::io::Result<RawMode> {
        let fd = std::io::stdin().as_raw_fd();
        // SAFETY: termios is plain data, filled by tcgetattr before use.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd is stdin, `saved` a valid termios.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut raw = saved;
        raw.c_lflag &= !(libc::ECHO | libc::ICANON | libc::ISIG | libc::IEXTEN);
        raw.c_iflag &= !(libc::IXON | libc::ICRNL | libc::INLCR);
        raw.c_cc[libc::VMIN] = 1;
        raw.c_cc[libc::VTIME] = 0;
        // SAFETY: as above.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(RawMode { fd, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the settings read in `enter`.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_history_walks_and_keeps_the_typed_line() {
        let hist = vec!["one".to_string(), "two".to_string()];
        let (mut at, mut buf, mut typed) = (2, "ty".chars().collect::<Vec<_>>(), Vec::new());
        step(&mut at, true, &hist, &mut buf, &mut typed);
        assert_eq!(buf.iter().collect::<String>(), "two");
        step(&mut at, true, &hist, &mut buf, &mut typed);
        step(&mut at, true, &hist, &mut buf, &mut typed);
        assert_eq!(buf.iter().collect::<String>(), "one");
        step(&mut at, false, &hist, &mut buf, &mut typed);
        step(&mut at, false, &hist, &mut buf, &mut typed);
        assert_eq!(buf.iter().collect::<String>(), "ty");
    }

    #[test]
    fn test_history_file_is_bounded_and_skips_repeats() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("h");
        let mut h = History {
            lines: vec![],
            file: Some(f.clone()),
        };
        for i in 0..(HISTORY_MAX + 5) {
            h.push(&format!("SELECT {i}"));
            h.push(&format!("SELECT {i}"));
        }
        h.push("  ");
        let text = std::fs::read_to_string(&f).unwrap();
        assert_eq!(text.lines().count(), HISTORY_MAX);
        assert_eq!(text.lines().next(), Some("SELECT 5"));
        assert_eq!(
            text.lines().last(),
            Some(format!("SELECT {}", HISTORY_MAX + 4).as_str())
        );
    }

    #[test]
    fn test_utf8_characters_read_whole() {
        let mut input: &[u8] = "é€x".as_bytes();
        assert_eq!(read_char(&mut input).unwrap(), Some('é'));
        assert_eq!(read_char(&mut input).unwrap(), Some('€'));
        assert_eq!(read_char(&mut input).unwrap(), Some('x'));
        assert_eq!(read_char(&mut input).unwrap(), None);
    }
}
