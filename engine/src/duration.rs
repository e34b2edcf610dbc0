//! Durations on the command line: `500ms`, `30s`, `5m`, `1h`, `7d`.

use std::time::Duration;

/// Parses a whole number followed by a unit (`ms`, `s`, `m`, `h`, `d`).
pub fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| {
        format!("`{text}` is not a duration: expected a number and a unit, such as 500ms, 30s, 5m, 1h, 7d")
    })?;
    let unit_ms = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("`{text}` has no known unit: use ms, s, m, h or d")),
    };
    number.checked_mul(unit_ms).map(Duration::from_millis).ok_or_else(|| format!("`{text}` is too long a duration"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_with_each_unit() {
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse("7d"), Ok(Duration::from_secs(7 * 86400)));
    }

    #[test]
    fn durations_without_a_number_or_a_unit_are_refused() {
        assert!(parse("30").is_err());
        assert!(parse("ms").is_err());
        assert!(parse("3 weeks").is_err());
        assert!(parse("-5s").is_err());
    }
}
