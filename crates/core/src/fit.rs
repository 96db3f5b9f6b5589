//! Text that fits a terminal: display widths, one-line cells, cutting with an ellipsis,
//! wrapping at spaces and column layout, so no line nixfarm prints is wider than the
//! terminal it goes to.

use unicode_width::UnicodeWidthChar;

/// Display columns of `s` (wide characters count 2, control characters 0).
pub fn width(s: &str) -> usize {
    s.chars().map(|c| c.width().unwrap_or(0)).sum()
}

/// `s` as one line a terminal shows as it is: newlines, tabs and other control characters
/// (escape sequences included) become spaces.
pub fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// `s` with its lines kept and every other control character (an escape sequence's ESC, a
/// carriage return) made a space: text from a build or an evaluation, printed on a terminal,
/// cannot move the cursor, retitle the window or hide what came before.
pub fn printable(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() && c != '\n' && c != '\t' {
                ' '
            } else {
                c
            }
        })
        .collect()
}

/// `s` cut to at most `max` columns, ending in `…` when something was cut.
pub fn fit(s: &str, max: usize) -> String {
    if width(s) <= max {
        return s.to_string();
    }
    if max == 0 {
        return String::new();
    }
    let mut out = String::new();
    let mut w = 0;
    for c in s.chars() {
        let cw = c.width().unwrap_or(0);
        if w + cw > max - 1 {
            break;
        }
        out.push(c);
        w += cw;
    }
    out.push('…');
    out
}

/// `s` broken at spaces into lines of at most `max` columns; lines after the first start
/// with `indent`. A word longer than a line is cut with `…`.
pub fn wrap(s: &str, max: usize, indent: &str) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    let mut cur = String::new();
    for word in s.split(' ').filter(|w| !w.is_empty()) {
        let lead = if lines.is_empty() { "" } else { indent };
        let candidate = if cur.is_empty() {
            format!("{lead}{word}")
        } else {
            format!("{cur} {word}")
        };
        if width(&candidate) <= max || cur.is_empty() {
            cur = fit(&candidate, max);
        } else {
            lines.push(std::mem::take(&mut cur));
            cur = fit(&format!("{indent}{word}"), max);
        }
    }
    if !cur.is_empty() || lines.is_empty() {
        lines.push(cur);
    }
    lines
}

/// Columns two spaces apart, flush left, a dashed rule under the header. With `max`, the
/// column `flex` gives up width first (its cells cut with `…`), then the widest others,
/// until every line fits; no line ends in spaces.
pub fn columns(header: &[&str], rows: &[Vec<String>], flex: usize, max: Option<usize>) -> String {
    let n = header.len();
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            (0..n)
                .map(|i| one_line(r.get(i).map_or("", |s| s)))
                .collect()
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| width(h)).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(width(c));
        }
    }
    if let Some(max) = max {
        let total = |w: &[usize]| w.iter().sum::<usize>() + 2 * n.saturating_sub(1);
        let floor: Vec<usize> = header.iter().map(|h| width(h).max(4)).collect();
        if flex < n && total(&widths) > max {
            let others = total(&widths) - widths[flex];
            widths[flex] = max
                .saturating_sub(others)
                .max(floor[flex])
                .min(widths[flex]);
        }
        while total(&widths) > max {
            let Some((i, _)) = widths
                .iter()
                .enumerate()
                .filter(|(i, w)| **w > floor[*i])
                .max_by_key(|(_, w)| **w)
            else {
                break;
            };
            widths[i] -= 1;
        }
    }
    let line = |cells: &[String]| -> String {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            let c = fit(c, *w);
            s.push_str(&c);
            if i + 1 < n {
                s.push_str(&" ".repeat(w - width(&c) + 2));
            }
        }
        let s = s.trim_end().to_string();
        match max {
            Some(m) => fit(&s, m),
            None => s,
        }
    };
    let mut out = String::new();
    let head: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    out.push_str(&line(&head));
    out.push('\n');
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    out.push_str(&line(&rule));
    out.push('\n');
    for r in &rows {
        out.push_str(&line(r));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {

    #[test]
    fn printable_text_keeps_lines_and_drops_escapes() {
        assert_eq!(
            printable("a\x1b]0;pwned\x07b\r\nc\td"),
            "a ]0;pwned b \nc\td"
        );
    }

    use super::*;

    #[test]
    fn fit_cuts_with_an_ellipsis_by_display_width() {
        assert_eq!(fit("abcdef", 6), "abcdef");
        assert_eq!(fit("abcdef", 4), "abc…");
        assert_eq!(width(&fit("日本語のテキスト", 7)), 7);
        assert_eq!(fit("abc", 0), "");
    }

    #[test]
    fn one_line_removes_newlines_and_escapes() {
        assert_eq!(one_line("a\nb\t\x1b[31mc"), "a b  [31mc");
    }

    #[test]
    fn wrap_breaks_at_spaces_and_indents() {
        let lines = wrap(
            "Ready: 9/19 (47.4%); 3 failed, 2 needs-hash, 1 unpinned",
            24,
            "  ",
        );
        assert!(lines.iter().all(|l| width(l) <= 24), "{lines:?}");
        assert_eq!(lines[0], "Ready: 9/19 (47.4%); 3");
        assert!(lines[1].starts_with("  "));
        assert_eq!(lines.join(" ").split_whitespace().count(), 9);
    }

    #[test]
    fn columns_shrink_the_flexible_column_first() {
        let rows = vec![
            vec!["a".into(), "x".repeat(100), "agent-1".into()],
            vec!["bbbb".into(), "short".into(), "agent-2".into()],
        ];
        let t = columns(&["pkg", "reason", "agent"], &rows, 1, Some(40));
        for l in t.lines() {
            assert!(width(l) <= 40, "{l:?}");
            assert_eq!(l, l.trim_end());
        }
        assert!(t.lines().nth(2).unwrap().ends_with("agent-1"));
        assert!(t.contains('…'));
        // Without a limit nothing is cut.
        let wide = columns(&["pkg", "reason", "agent"], &rows, 1, None);
        assert!(wide.contains(&"x".repeat(100)));
    }

    #[test]
    fn columns_fit_even_when_other_columns_are_too_wide() {
        let rows = vec![vec!["p".repeat(70), "r".into(), "a".repeat(40)]];
        let t = columns(&["package", "reason", "agent"], &rows, 1, Some(30));
        assert!(t.lines().all(|l| width(l) <= 30), "{t}");
    }
}
