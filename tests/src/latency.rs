//! Summaries of measured latencies, shared by the tests that bound them and
//! the `watch-latency` bench that reports them.

/// Percentile `q` (0..=1) of `values` (sorted in place).
pub fn percentile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let index = ((values.len() - 1) as f64 * q).round() as usize;
    values[index]
}
