//! A vectorisable `exp` for the CPU loops that take one per element: the inference scan
//! ([`super::scan_cpu_infer`]) and `eval`'s log-softmax of a logits row.

/// `exp(x)` in f32 within 2 ulp of the exact value for x in [−87, 88] (below: a value under
/// 2⁻¹²⁵ instead of the subnormal or 0; above: clamped near f32::MAX), branch-free so a loop of
/// it vectorises. Cody–Waite reduction x = n·ln2 + r, |r| ≤ ln2/2, then a degree-7 polynomial.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75; // ln 2 split so n·LN2_HI is exact for |n| < 2¹⁰
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5·2²³: adding it rounds to an integer in the low bits
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND; // round(x·log₂e)
    let r = (x - n * LN2_HI) - n * LN2_LO;
    // e^r on |r| ≤ ln2/2: Taylor to r⁷, summed as 1 + (r + r²·q) so the rounding of the small
    // terms does not reach the leading ones
    let q = 0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))));
    let p = 1.0 + (r + r * r * q);
    // 2ⁿ from the integer held in t's low mantissa bits
    let e = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    p * f32::from_bits(((e + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::exp_f32;

    #[test]
    fn exp_within_two_ulp() {
        let mut worst = 0i64;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let want = (x as f64).exp() as f32;
            let ulp = (exp_f32(x).to_bits() as i64 - want.to_bits() as i64).abs();
            worst = worst.max(ulp);
            x += 0.000_37;
        }
        assert!(worst <= 2, "exp_f32 off by {worst} ulp");
        assert_eq!(exp_f32(0.0), 1.0);
    }
}
