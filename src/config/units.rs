//! Durations (`500ms`, `2s`, `5m`, `1h`, `90d`) and sizes (`16KiB`, `10MiB`) as written in the
//! config file.

use std::time::Duration;

/// Parses `500ms`, `2s`, `5m`, `1h`, `90d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let err = || format!("expected a duration such as `500ms`, `2s`, `5m` or `90d`, got `{s}`");
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| err())?;
    let secs = |k: u64| n.checked_mul(k).map(Duration::from_secs).ok_or_else(err);
    let d = match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        "d" => secs(86_400),
        _ => Err(err()),
    }?;
    // Past this, deadlines overflow the clock (found by fuzzing): no timeout needs more.
    if d > MAX_DURATION {
        return Err(format!("at most 36500d (100 years), got `{s}`"));
    }
    Ok(d)
}

const MAX_DURATION: Duration = Duration::from_secs(36_500 * 86_400);

/// Parses `512`, `512B`, `16KiB`, `10MiB`, `1GiB` (and the decimal `KB`, `MB`, `GB`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let err = || format!("expected a size such as `16KiB` or `10MiB`, got `{s}`");
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| err())?;
    let k: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(err()),
    };
    n.checked_mul(k).ok_or_else(err)
}
