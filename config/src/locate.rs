//! Finds the line of an export or of one of its fields in block-style YAML, so that semantic
//! errors (found after parsing, when serde's positions are gone) still name a line.
//! Flow-style YAML simply yields no line; the error then names the export and field only.

/// Line index of `exports:` items in the source text.
pub(crate) struct LineIndex<'a> {
    lines: Vec<&'a str>,
    /// 0-based start line of each item of the top-level `exports:` sequence.
    item_starts: Vec<usize>,
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// Column of the first key of a sequence item (`  - name: a` → 4), or of a key line.
fn key_column(line: &str) -> usize {
    let t = line.trim_start();
    match t.strip_prefix('-') {
        Some(rest) => line.len() - rest.trim_start().len(),
        None => indent(line),
    }
}

/// The key a line starts with (after a sequence item's `- `).
fn starts_with_key(line: &str, key: &str) -> bool {
    let t = line.trim_start();
    t.strip_prefix("- ")
        .unwrap_or(t)
        .trim_start()
        .starts_with(key)
}

/// First line in `range` holding `field:` as a key of the item that starts at `start`:
/// at the item's own key column if there is one (so `size:` is not taken from inside a
/// `create:` block), else at any depth. A nested field `parent.child` (`rbd.pool`) is the
/// `child:` line of a block-style `parent:` map, or else the `parent:` line (flow style).
fn find_key(
    lines: &[&str],
    start: usize,
    range: std::ops::Range<usize>,
    field: &str,
) -> Option<usize> {
    if let Some((parent, child)) = field.split_once('.') {
        let at = find_key(lines, start, range.clone(), parent)?;
        let column = key_column(lines[at]);
        let key = format!("{child}:");
        let inside = (at + 1..range.end)
            .take_while(|&i| is_blank_or_comment(lines[i]) || indent(lines[i]) > column)
            .find(|&i| starts_with_key(lines[i], &key));
        return Some(inside.unwrap_or(at));
    }
    let key = format!("{field}:");
    let column = key_column(lines[start]);
    range
        .clone()
        .find(|&i| starts_with_key(lines[i], &key) && key_column(lines[i]) == column)
        .or_else(|| range.into_iter().find(|&i| starts_with_key(lines[i], &key)))
}

fn is_blank_or_comment(line: &str) -> bool {
    let t = line.trim_start();
    t.is_empty() || t.starts_with('#')
}

impl<'a> LineIndex<'a> {
    pub(crate) fn new(text: &'a str) -> Self {
        let lines: Vec<&str> = text.lines().collect();
        let mut item_starts = Vec::new();
        let exports_at = lines
            .iter()
            .position(|l| indent(l) == 0 && l.trim_end().starts_with("exports:"));
        if let Some(start) = exports_at {
            let mut item_indent = None;
            for (i, line) in lines.iter().enumerate().skip(start + 1) {
                if is_blank_or_comment(line) {
                    continue;
                }
                if indent(line) == 0 && !line.starts_with('-') {
                    break; // next top-level key
                }
                let trimmed = line.trim_start();
                if trimmed.starts_with("- ") || trimmed == "-" {
                    let this = indent(line);
                    match item_indent {
                        None => {
                            item_indent = Some(this);
                            item_starts.push(i);
                        }
                        Some(level) if level == this => item_starts.push(i),
                        _ => {}
                    }
                }
            }
        }
        LineIndex { lines, item_starts }
    }

    /// 1-based line of export `index`, if it can be found.
    pub(crate) fn export_line(&self, index: usize) -> Option<usize> {
        self.item_starts.get(index).map(|l| l + 1)
    }

    /// 1-based line of `field` inside export `index`, falling back to the export's line.
    pub(crate) fn field_line(&self, index: usize, field: &str) -> Option<usize> {
        let start = *self.item_starts.get(index)?;
        let end = self
            .item_starts
            .get(index + 1)
            .copied()
            .unwrap_or(self.lines.len());
        find_key(&self.lines, start, start..end, field)
            .map(|i| i + 1)
            .or(Some(start + 1))
    }

    /// 0-based line range of export `index`.
    fn export_range(&self, index: usize) -> Option<(usize, usize)> {
        let start = *self.item_starts.get(index)?;
        let end = self
            .item_starts
            .get(index + 1)
            .copied()
            .unwrap_or(self.lines.len());
        Some((start, end))
    }

    /// 0-based start lines of the items of the `luns:` list inside export `index`.
    fn lun_starts(&self, index: usize) -> Vec<usize> {
        let Some((start, end)) = self.export_range(index) else {
            return Vec::new();
        };
        let Some(key) = (start..end).find(|&i| {
            let t = self.lines[i].trim_start();
            t.strip_prefix("- ")
                .unwrap_or(t)
                .trim_start()
                .starts_with("luns:")
        }) else {
            return Vec::new();
        };
        let key_indent = indent(self.lines[key]);
        let mut items = Vec::new();
        let mut item_indent = None;
        for i in key + 1..end {
            let line = self.lines[i];
            if is_blank_or_comment(line) {
                continue;
            }
            if indent(line) <= key_indent && !line.trim_start().starts_with("- ") {
                break;
            }
            let t = line.trim_start();
            if t.starts_with("- ") || t == "-" {
                match item_indent {
                    None => {
                        item_indent = Some(indent(line));
                        items.push(i);
                    }
                    Some(level) if level == indent(line) => items.push(i),
                    _ => {}
                }
            }
        }
        items
    }

    /// 1-based line of `field` in LUN `lun` of export `index`, falling back to the LUN's
    /// line, then the export's `luns:` field.
    pub(crate) fn lun_field_line(&self, index: usize, lun: usize, field: &str) -> Option<usize> {
        let starts = self.lun_starts(index);
        let Some(&start) = starts.get(lun) else {
            return self.field_line(index, "luns");
        };
        let end = starts
            .get(lun + 1)
            .copied()
            .or_else(|| self.export_range(index).map(|(_, e)| e))
            .unwrap_or(self.lines.len());
        find_key(&self.lines, start, start..end, field)
            .map(|i| i + 1)
            .or(Some(start + 1))
    }

    /// 1-based line of a top-level key.
    pub(crate) fn top_level_line(&self, key: &str) -> Option<usize> {
        let key = format!("{key}:");
        self.lines
            .iter()
            .position(|l| indent(l) == 0 && l.starts_with(&key))
            .map(|i| i + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::LineIndex;

    #[test]
    fn finds_items_and_fields() {
        let text = "state_dir: /x\n# comment\nexports:\n  - name: a\n    socket: /s1\n\n  - name: b\n    path: /p\n    socket: /s2\nmetrics:\n  listen: 1.2.3.4:5\n";
        let index = LineIndex::new(text);
        assert_eq!(index.export_line(0), Some(4));
        assert_eq!(index.export_line(1), Some(7));
        assert_eq!(index.export_line(2), None);
        assert_eq!(index.field_line(0, "socket"), Some(5));
        assert_eq!(index.field_line(1, "socket"), Some(9));
        assert_eq!(index.field_line(1, "name"), Some(7));
        assert_eq!(index.field_line(1, "serial"), Some(7));
        assert_eq!(index.top_level_line("metrics"), Some(10));
    }

    #[test]
    fn finds_lun_items_and_fields() {
        let text = "exports:\n  - name: s\n    type: scsi\n    luns:\n      - path: /a\n        serial: x\n      - lun: 5\n        path: /b\n  - name: t\n";
        let index = LineIndex::new(text);
        assert_eq!(index.lun_field_line(0, 0, "path"), Some(5));
        assert_eq!(index.lun_field_line(0, 0, "serial"), Some(6));
        assert_eq!(index.lun_field_line(0, 1, "path"), Some(8));
        assert_eq!(index.lun_field_line(0, 1, "wwn"), Some(7));
        assert_eq!(
            index.lun_field_line(0, 2, "path"),
            Some(4),
            "falls back to luns:"
        );
        assert_eq!(index.export_line(1), Some(9));
    }

    #[test]
    fn nested_fields_in_block_and_flow_style() {
        let text = "exports:
  - name: a
    rbd:
      pool: p

      image: i
    create: { size: 1M }
  - name: b
    rbd: { pool: p, image: i }
";
        let index = LineIndex::new(text);
        assert_eq!(index.field_line(0, "rbd.pool"), Some(4));
        assert_eq!(index.field_line(0, "rbd.image"), Some(6));
        assert_eq!(
            index.field_line(0, "rbd.conf"),
            Some(3),
            "falls back to rbd:"
        );
        assert_eq!(index.field_line(1, "rbd.image"), Some(9));
    }

    #[test]
    fn a_key_of_the_item_wins_over_the_same_key_nested_deeper() {
        let text = "exports:
  - name: a
    create:
      size: 1M
    size: 2M
  - name: s
    luns:
      - path: /a
        create:
          size: 1M
        size: 2M
";
        let index = LineIndex::new(text);
        assert_eq!(index.field_line(0, "size"), Some(5));
        assert_eq!(index.lun_field_line(1, 0, "size"), Some(11));
    }
}
