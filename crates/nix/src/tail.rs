//! Log tails: the last bytes of a process's output, kept bounded for reports.

/// The last `max` bytes of a string without its colours (Nix colours its messages even when
/// no terminal reads them), cut at a line start where possible.
pub fn tail(s: &str, max: usize) -> String {
    let plain;
    let s = if s.contains('\u{1b}') {
        plain = crate::messages::strip_ansi(s);
        plain.as_str()
    } else {
        s
    };
    if s.len() <= max {
        return s.to_string();
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    let cut = &s[start..];
    match cut.find('\n') {
        Some(i) if i + 1 < cut.len() => cut[i + 1..].to_string(),
        _ => cut.to_string(),
    }
}

/// Bytes of one line a [`TailBuffer`] keeps: a longer line (a minified file, a progress bar
/// redrawn with `\r`) is cut there, so it does not push the lines around it, the error
/// Nix prints after it included, out of the tail.
const LINE_MAX: usize = 4096;

/// Keeps the last bytes of a stream, bounded whatever its length; a build log's
/// ([`TailBuffer::build_log`]) each line at most [`LINE_MAX`] bytes of it, with how much was
/// left out.
pub(crate) struct TailBuffer {
    buf: Vec<u8>,
    cap: usize,
    /// Longest line kept whole (usize::MAX: any).
    line_max: usize,
    /// Bytes of the current line kept, and left out.
    line: usize,
    cut: usize,
}

impl TailBuffer {
    /// The last `cap` bytes, as they came.
    pub(crate) fn new(cap: usize) -> Self {
        TailBuffer {
            buf: Vec::new(),
            cap,
            line_max: usize::MAX,
            line: 0,
            cut: 0,
        }
    }

    /// The last `cap` bytes of a build's log, each line cut at [`LINE_MAX`].
    pub(crate) fn build_log(cap: usize) -> Self {
        TailBuffer {
            line_max: LINE_MAX,
            ..Self::new(cap)
        }
    }

    pub(crate) fn push(&mut self, data: &[u8]) {
        let mut rest = data;
        while !rest.is_empty() {
            let (body, ends) = match rest.iter().position(|b| *b == b'\n') {
                Some(i) => (&rest[..i], Some(i + 1)),
                None => (rest, None),
            };
            let keep = body.len().min(self.line_max.saturating_sub(self.line));
            self.buf.extend_from_slice(&body[..keep]);
            self.line = self.line.saturating_add(keep);
            self.cut += body.len() - keep;
            match ends {
                Some(n) => {
                    self.end_cut_line();
                    self.buf.push(b'\n');
                    self.line = 0;
                    rest = &rest[n..];
                }
                None => rest = &[],
            }
        }
        if self.buf.len() > self.cap * 2 {
            let drop = self.buf.len() - self.cap;
            self.buf.drain(..drop);
        }
    }

    /// Says how much of the line that ends here was left out.
    fn end_cut_line(&mut self) {
        if self.cut > 0 {
            let note = format!(" … [{} more bytes of this line left out]", self.cut);
            self.buf.extend_from_slice(note.as_bytes());
            self.cut = 0;
        }
    }

    pub(crate) fn text(&self) -> String {
        let start = self.buf.len().saturating_sub(self.cap);
        let mut text = String::from_utf8_lossy(&self.buf[start..]).to_string();
        if self.cut > 0 {
            text.push_str(&format!(
                " … [{} more bytes of this line left out]",
                self.cut
            ));
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_line_is_cut_and_the_lines_after_it_stay() {
        let mut t = TailBuffer::build_log(16 * 1024);
        t.push(b"error: builder failed\n");
        let long = vec![b'x'; 5_000_000];
        for part in long.chunks(65536) {
            t.push(part);
        }
        t.push(b"\nFor full logs, run 'nix log'.\n");
        let text = t.text();
        assert!(
            text.starts_with("error: builder failed\nxxx"),
            "{}",
            &text[..40]
        );
        assert!(
            text.contains(&format!(
                " … [{} more bytes of this line left out]\nFor full logs",
                5_000_000 - LINE_MAX
            )),
            "{}",
            &text[text.len() - 120..]
        );
        assert!(text.len() < LINE_MAX + 200);
        // Still unfinished: said too.
        let mut t = TailBuffer::build_log(1024);
        t.push(&vec![b'y'; 5000]);
        assert!(
            t.text()
                .ends_with(" … [904 more bytes of this line left out]")
        );
        // Any other stream's tail is its last bytes.
        let mut t = TailBuffer::new(1024);
        t.push(&vec![b'y'; 5000]);
        assert_eq!(t.text(), "y".repeat(1024));
    }

    #[test]
    fn a_tail_has_no_colours() {
        let s = "error: \u{1b}[0mbuilder for '\u{1b}[35;1m/nix/store/x-a.drv\u{1b}[0m' failed";
        assert_eq!(
            tail(s, 1000),
            "error: builder for '/nix/store/x-a.drv' failed"
        );
    }
}
