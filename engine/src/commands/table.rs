//! The tables the commands print for a person: each column as wide as its widest cell
//! (a long type or instance name widens its column instead of pushing the rest of its
//! line out of line), one space between columns, the last column unpadded.

use crate::outln;

/// Where a column's cells sit: text on the left, numbers on the right.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// A table being filled, printed at once by [`Table::print`].
#[derive(Debug)]
pub struct Table {
    headers: Vec<(String, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers.
    pub fn new(headers: &[(&str, Align)]) -> Self {
        Self { headers: headers.iter().map(|(h, a)| ((*h).to_owned(), *a)).collect(), rows: Vec::new() }
    }

    /// Adds a row: a cell per column.
    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.headers.len(), "a cell per column");
        self.rows.push(cells);
    }

    /// The header line and the rows, each a line without trailing spaces.
    pub fn lines(&self) -> Vec<String> {
        let widths: Vec<usize> = (0..self.headers.len())
            .map(|c| {
                let cells = self.rows.iter().map(|r| r[c].chars().count());
                cells.chain([self.headers[c].0.chars().count()]).max().unwrap_or(0)
            })
            .collect();
        let line = |cells: &mut dyn Iterator<Item = &String>| {
            let last = self.headers.len() - 1;
            let mut out = String::new();
            for (c, cell) in cells.enumerate() {
                if c > 0 {
                    out.push(' ');
                }
                let pad = " ".repeat(widths[c] - cell.chars().count());
                match self.headers[c].1 {
                    Align::Right => out.push_str(&format!("{pad}{cell}")),
                    Align::Left if c == last => out.push_str(cell),
                    Align::Left => out.push_str(&format!("{cell}{pad}")),
                }
            }
            out.trim_end().to_owned()
        };
        let mut lines = vec![line(&mut self.headers.iter().map(|(h, _)| h))];
        lines.extend(self.rows.iter().map(|r| line(&mut r.iter())));
        lines
    }

    /// Prints the header line and the rows.
    pub fn print(&self) -> anyhow::Result<()> {
        for line in self.lines() {
            outln!("{line}");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_column_is_as_wide_as_its_widest_cell() {
        let mut table = Table::new(&[("NAME", Align::Left), ("N", Align::Right), ("NOTE", Align::Left)]);
        table.row(vec!["a_rather_long_type_name".into(), "7".into(), "".into()]);
        table.row(vec!["b".into(), "1234".into(), "why".into()]);
        assert_eq!(
            table.lines(),
            ["NAME                       N NOTE", "a_rather_long_type_name    7", "b                       1234 why",]
        );
    }
}
