//! Man pages for `cairn` and each of its subcommands, made from the binary's own `--help`.
//!
//! The help text is the one source of truth (clap renders it from the gateway's argument
//! definitions), so pages can never drift from the binary they ship with. The binary runs
//! through the target's runner, so an ARM package documents the ARM binary itself. This is
//! the help2man idea in a few dozen lines, without a Perl dependency and with subcommands.

use crate::dist::LinuxTarget;
use anyhow::{Context, Result, bail};
use std::path::Path;

/// One rendered page: file name (`cairn-node.1`) and roff source.
pub struct ManPage {
    pub file_name: String,
    pub roff: String,
}

/// Sections appended to the top-level page: what is true of the package, not of the flags.
const PACKAGE_SECTIONS: &str = r#".SH FILES
.TP
.I /etc/cairn/cairn.toml
Configuration read by the systemd unit (\fBcairn node \-\-config /etc/cairn/cairn.toml\fR).
Every command-line flag has a key of the same name with dashes turned into underscores;
flags win over the file.
.TP
.I /var/lib/cairn
The node's data directory: Raft log, snapshots and the SQLite replica. Owned by the
\fBcairn\fR system user.
.TP
.I /lib/systemd/system/cairn.service
The systemd unit. Local changes go in a drop-in: \fBsystemctl edit cairn\fR.
.SH ENVIRONMENT
.TP
.B RUST_LOG
Log filter in tracing's env-filter syntax (for example \fBinfo,openraft=warn\fR);
overrides the level from the configuration file.
.SH EXIT STATUS
0 on success, non-zero with a message on standard error otherwise. On SIGTERM a node
hands over leadership if it holds it, then exits.
"#;

/// Renders the page for `cairn` and, recursively, for every subcommand.
pub fn render_all(
    target: &LinuxTarget,
    binary: &Path,
    version: &str,
    date: &str,
) -> Result<Vec<ManPage>> {
    let mut pages = Vec::new();
    render(target, binary, &[], version, date, &mut pages)?;
    // The top page lists every other page under SEE ALSO.
    let see_also: Vec<String> = pages[1..]
        .iter()
        .map(|p| format!(".BR {} (1)", p.file_name.trim_end_matches(".1")))
        .collect();
    let top = &mut pages[0];
    top.roff.push_str(PACKAGE_SECTIONS);
    if !see_also.is_empty() {
        top.roff.push_str(".SH SEE ALSO\n");
        top.roff.push_str(&see_also.join(",\n"));
        top.roff.push('\n');
    }
    Ok(pages)
}

fn render(
    target: &LinuxTarget,
    binary: &Path,
    path: &[String],
    version: &str,
    date: &str,
    pages: &mut Vec<ManPage>,
) -> Result<()> {
    let output = target
        .runner(binary)
        .args(path)
        .arg("--help")
        .output()
        .with_context(|| format!("running {} --help", binary.display()))?;
    let help = String::from_utf8(output.stdout).context("--help output is not UTF-8")?;
    if !output.status.success() || help.trim().is_empty() {
        bail!(
            "`cairn {} --help` failed ({}): {}",
            path.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let help = Help::parse(&help);
    let name = std::iter::once("cairn")
        .chain(path.iter().map(String::as_str))
        .collect::<Vec<_>>()
        .join("-");
    let command = std::iter::once("cairn")
        .chain(path.iter().map(String::as_str))
        .collect::<Vec<_>>()
        .join(" ");
    pages.push(ManPage {
        file_name: format!("{name}.1"),
        roff: help.to_roff(&name, &command, version, date),
    });
    for sub in help.subcommands() {
        let mut sub_path = path.to_vec();
        sub_path.push(sub);
        render(target, binary, &sub_path, version, date, pages)?;
    }
    Ok(())
}

/// clap's help output split into its parts.
struct Help {
    /// Text before `Usage:`: the about line, then any long description.
    about: Vec<String>,
    /// What follows `Usage: `.
    usage: String,
    /// `Commands:`, `Arguments:`, `Options:` and any custom headings, in order.
    sections: Vec<(String, Vec<String>)>,
}

impl Help {
    fn parse(text: &str) -> Help {
        let mut about = Vec::new();
        let mut usage = String::new();
        let mut sections: Vec<(String, Vec<String>)> = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("Usage: ") {
                usage = rest.trim().to_string();
            } else if !line.starts_with(' ') && line.ends_with(':') && !line.contains("  ") {
                sections.push((line.trim_end_matches(':').to_string(), Vec::new()));
            } else if let Some((_, lines)) = sections.last_mut() {
                lines.push(line.to_string());
            } else if usage.is_empty() {
                about.push(line.trim_end().to_string());
            }
        }
        while about.last().is_some_and(|l| l.is_empty()) {
            about.pop();
        }
        Help {
            about,
            usage,
            sections,
        }
    }

    /// Names listed under `Commands:`, except clap's own `help`.
    fn subcommands(&self) -> Vec<String> {
        self.sections
            .iter()
            .filter(|(title, _)| title == "Commands")
            .flat_map(|(_, lines)| lines.iter())
            .filter(|l| l.starts_with("  ") && !l.starts_with("     "))
            .filter_map(|l| l.split_whitespace().next())
            .filter(|name| *name != "help")
            .map(str::to_string)
            .collect()
    }

    fn to_roff(&self, name: &str, command: &str, version: &str, date: &str) -> String {
        let mut out = String::new();
        let summary = self.about.first().map(String::as_str).unwrap_or("");
        out.push_str(&format!(
            ".TH {} 1 \"{date}\" \"cairn {version}\" \"Cairn Manual\"\n",
            name.to_uppercase()
        ));
        out.push_str(&format!(".SH NAME\n{name} \\- {}\n", escape(summary)));
        let args = self
            .usage
            .strip_prefix(command)
            .unwrap_or(&self.usage)
            .trim();
        out.push_str(&format!(".SH SYNOPSIS\n.B {command}\n{}\n", escape(args)));
        out.push_str(".SH DESCRIPTION\n");
        out.push_str(&paragraphs(&self.about));
        for (title, lines) in &self.sections {
            out.push_str(&format!(".SH {}\n", escape(&title.to_uppercase())));
            out.push_str(&items(lines));
        }
        out
    }
}

/// Plain text lines to roff paragraphs (blank line = new paragraph).
fn paragraphs(lines: &[String]) -> String {
    let mut out = String::new();
    for line in lines {
        if line.trim().is_empty() {
            out.push_str(".PP\n");
        } else {
            out.push_str(&escape(line.trim()));
            out.push('\n');
        }
    }
    out
}

/// The body of an options/commands section. clap puts a term (`-n, --node-id <ID>`) at an
/// indent below 8 columns, its description either after two or more spaces on the same
/// line or on the following lines at a deeper indent.
fn items(lines: &[String]) -> String {
    let mut out = String::new();
    let mut in_item = false;
    for line in lines {
        let indent = line.len() - line.trim_start().len();
        let text = line.trim();
        if text.is_empty() {
            if in_item {
                out.push_str(".IP\n");
            }
            continue;
        }
        if indent < 8 {
            let (term, desc) = match text.find("  ") {
                Some(i) => (&text[..i], text[i..].trim()),
                None => (text, ""),
            };
            out.push_str(&format!(".TP\n\\fB{}\\fR\n", escape_term(term)));
            if !desc.is_empty() {
                out.push_str(&escape(desc));
                out.push('\n');
            }
            in_item = true;
        } else {
            out.push_str(&escape(text));
            out.push('\n');
        }
    }
    // A trailing `.IP` from a blank last line would leave an empty paragraph.
    while out.ends_with(".IP\n") {
        out.truncate(out.len() - 4);
    }
    out
}

/// Escapes text for roff: backslashes, and control characters at the start of a line.
fn escape(text: &str) -> String {
    let text = text.replace('\\', "\\e");
    if text.starts_with('.') || text.starts_with('\'') {
        format!("\\&{text}")
    } else {
        text
    }
}

/// Option names are typed literally, so their dashes are minus signs.
fn escape_term(term: &str) -> String {
    escape(term).replace('-', "\\-")
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOP: &str = "\
Cairn gateway daemon

Usage: cairn [OPTIONS] <COMMAND>

Commands:
  node    Run one node of a cluster
  device  Manage devices
  help    Print this message or the help of the given subcommand(s)

Options:
  -h, --help
          Print help

  -V, --version
          Print version
";

    #[test]
    fn test_parse_sections_and_subcommands() {
        let help = Help::parse(TOP);
        assert_eq!(help.about, ["Cairn gateway daemon"]);
        assert_eq!(help.usage, "cairn [OPTIONS] <COMMAND>");
        let titles: Vec<&str> = help.sections.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(titles, ["Commands", "Options"]);
        assert_eq!(help.subcommands(), ["node", "device"]);
    }

    #[test]
    fn test_roff() {
        let roff = Help::parse(TOP).to_roff("cairn", "cairn", "0.1.0", "2026-01-01");
        assert!(roff.starts_with(".TH CAIRN 1 \"2026-01-01\" \"cairn 0.1.0\""));
        assert!(roff.contains(".SH NAME\ncairn \\- Cairn gateway daemon\n"));
        assert!(roff.contains(".SH SYNOPSIS\n.B cairn\n[OPTIONS] <COMMAND>\n"));
        assert!(roff.contains(".TP\n\\fBnode\\fR\nRun one node of a cluster\n"));
        assert!(roff.contains(".TP\n\\fB\\-h, \\-\\-help\\fR\nPrint help\n.IP\n"));
        assert!(roff.ends_with("Print version\n"));
    }

    #[test]
    fn test_escape() {
        assert_eq!(escape(".hidden"), "\\&.hidden");
        assert_eq!(escape("a\\b"), "a\\eb");
    }
}
