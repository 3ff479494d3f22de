//! FP8 E4M3 (the OCP 8-bit float "e4m3fn", as CUDA's `__nv_fp8_e4m3` on sm_89+): one sign bit,
//! four exponent bits (bias 7), three mantissa bits; no infinities, `0x7F`/`0xFF` are NaN, the
//! largest finite value is 448 (`0x7E`), the smallest subnormal 2⁻⁹ (`0x01`).

/// The largest finite E4M3 value.
pub const E4M3_MAX: f32 = 448.0;

/// The value of an E4M3 code (NaN for `0x7F` / `0xFF`).
pub fn decode(code: u8) -> f32 {
    let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
    let e = i32::from((code >> 3) & 0x0F);
    let m = f32::from(code & 0x07);
    if e == 0x0F && m == 7.0 {
        return f32::NAN;
    }
    let mag = match e {
        0 => m / 8.0 * 2f32.powi(-6),
        _ => (1.0 + m / 8.0) * 2f32.powi(e - 7),
    };
    sign * mag
}

/// The nearest E4M3 code of `x`, ties to the even code; |x| past 448 saturates to ±448 and NaN
/// gives 0 (callers scale their values into range first, see [`crate::quant::QWeight`]).
pub fn encode(x: f32) -> u8 {
    if x.is_nan() {
        return 0;
    }
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs();
    if a >= E4M3_MAX {
        return sign | 0x7E;
    }
    // the positive finite codes 0..=0x7E are increasing in value: find lo with v(lo) <= a < v(lo+1)
    let (mut lo, mut hi) = (0u8, 0x7Eu8);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if decode(mid) <= a {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let (dl, dh) = (a - decode(lo), decode(hi) - a);
    let code = if dl < dh || (dl == dh && lo % 2 == 0) { lo } else { hi };
    sign | code
}

/// The distance from the E4M3 value of `code` to its larger-magnitude neighbour (the spacing
/// that bounds the rounding error of values next to it: half of it either side).
pub fn spacing(code: u8) -> f32 {
    let c = code & 0x7F;
    match c {
        0x7E => decode(0x7E) - decode(0x7D),
        _ => decode(c + 1) - decode(c),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_codes() {
        assert_eq!(decode(0x00), 0.0);
        assert_eq!(decode(0x01), 2f32.powi(-9));
        assert_eq!(decode(0x38), 1.0);
        assert_eq!(decode(0x7E), 448.0);
        assert_eq!(decode(0xB8), -1.0);
        assert!(decode(0x7F).is_nan() && decode(0xFF).is_nan());
    }

    #[test]
    fn every_code_round_trips() {
        for c in (0u8..=0xFE).filter(|&c| c != 0x7F && c != 0x80) {
            assert_eq!(encode(decode(c)), c, "code {c:#04x}");
        }
    }

    #[test]
    fn encode_is_nearest_within_half_spacing() {
        let mut x = -460.0f32;
        while x < 460.0 {
            let c = encode(x);
            let err = (decode(c) - x).abs();
            let best = (0u8..=0xFE)
                .filter(|&c| c != 0x7F && c != 0xFF)
                .map(|c| (decode(c) - x.clamp(-448.0, 448.0)).abs())
                .fold(f32::INFINITY, f32::min);
            assert!(
                (err - best).abs() <= best * 1e-6 + (x.abs() - 448.0).max(0.0),
                "x {x}: code {c:#04x} err {err}, best {best}"
            );
            x += 0.173;
        }
        // a tie goes to the even code: 1 + 1/16 sits between 1 (0x38) and 1.125 (0x39)
        assert_eq!(encode(1.0625), 0x38);
        assert_eq!(encode(1.1875), 0x3A); // between 0x39 and 0x3A: even
    }
}
