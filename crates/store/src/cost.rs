//! `store cost`: the seed's monthly storage cost table for what the store holds.

use serde::Serialize;

use crate::object::ObjectInfo;

/// S3 Standard, us-east-1, per GB-month (the seed's price).
pub const DEFAULT_PRICE_PER_GB: f64 = 0.023;
const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// One object's monthly cost.
#[derive(Debug, Clone, Serialize)]
pub struct CostLine {
    /// Key.
    pub key: String,
    /// Bytes.
    pub size: u64,
    /// US dollars per month.
    pub monthly_usd: f64,
}

/// The whole table.
#[derive(Debug, Clone, Serialize)]
pub struct CostReport {
    /// Price used, USD per GB-month (GB as AWS bills it: 2^30 bytes).
    pub price_per_gb: f64,
    /// Per object.
    pub lines: Vec<CostLine>,
    /// Sum of sizes.
    pub total_size: u64,
    /// Sum of costs.
    pub total_monthly_usd: f64,
}

/// Costs of `objects` at `price_per_gb`.
pub fn cost(objects: &[ObjectInfo], price_per_gb: f64) -> CostReport {
    let lines: Vec<CostLine> = objects
        .iter()
        .map(|o| CostLine {
            key: o.key.clone(),
            size: o.size,
            monthly_usd: o.size as f64 / GIB * price_per_gb,
        })
        .collect();
    CostReport {
        price_per_gb,
        total_size: lines.iter().map(|l| l.size).sum(),
        total_monthly_usd: lines.iter().map(|l| l.monthly_usd).sum(),
        lines,
    }
}

/// Dollars the way the seed writes them: `$0.012`, `$0.0005`, `$1.50`.
pub fn format_usd(x: f64) -> String {
    // Half-up rounding (0.0115 → 0.012, as in the seed), not the binary value's.
    let round = |v: f64, digits: i32| {
        let f = 10f64.powi(digits);
        (v * f + 1e-9).round() / f
    };
    if x >= 1.0 {
        format!("${:.2}", round(x, 2))
    } else if x >= 0.001 {
        format!("${:.3}", round(x, 3))
    } else if x >= 0.00005 {
        format!("${:.4}", round(x, 4))
    } else if x > 0.0 {
        "<$0.0001".into()
    } else {
        "$0".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_numbers() {
        let mib = 1024 * 1024;
        let o = |k: &str, s: u64| ObjectInfo {
            key: k.into(),
            size: s,
            last_modified: None,
            etag: None,
            version_id: None,
            metadata: Default::default(),
        };
        let r = cost(
            &[
                o("vmlinux", 20 * mib + 400 * 1024),
                o("rootfs-base.ext4", 512 * mib),
                o("rootfs-rust.ext4", 2048 * mib),
            ],
            DEFAULT_PRICE_PER_GB,
        );
        assert_eq!(format_usd(r.lines[0].monthly_usd), "$0.0005");
        assert_eq!(format_usd(r.lines[1].monthly_usd), "$0.012");
        assert_eq!(format_usd(r.lines[2].monthly_usd), "$0.046");
        assert_eq!(format_usd(12.5), "$12.50");
    }
}
