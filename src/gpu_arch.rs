//! Which GPU architectures the CUDA kernels are compiled for, and whether a given card can run
//! them.
//!
//! The build compiles every `kernels/*.cu` to one fat binary holding SASS (machine code) for each
//! architecture in the list plus PTX of the newest, which the driver compiles for any later card.
//! The rules the driver follows (CUDA C Programming Guide, "Binary Compatibility"):
//! SASS for `sm_XY` runs on cards of compute capability `X.Z` with `Z >= Y` (same major
//! version); PTX for `compute_XY` runs on any card of capability `>= X.Y`.
//!
//! This file is self-contained (std only): `build.rs` includes it with `#[path]` to turn
//! `BLACKMAMBA_KERNEL_ARCHS` into nvcc arguments, so the build and the run-time check share one rule.

/// The architectures built when `BLACKMAMBA_KERNEL_ARCHS` is not set: A100 (80), RTX 30xx / A10 / A40
/// (86), RTX 40xx / L4 / L40 (89) and H100 / H200 (90), with PTX of 90 for newer cards.
pub const DEFAULT_ARCHS: &[u32] = &[80, 86, 89, 90];

/// The oldest architecture the kernels support (bf16 arithmetic and `cp.async` need sm_80).
pub const MIN_ARCH: u32 = 80;

/// The first architecture with the Hopper-only features the decoder may use: programmatic
/// dependent launch (`griddepcontrol`), bulk L2 prefetch and thread-block clusters.
pub const HOPPER_ARCH: u32 = 90;

/// The architectures this binary's kernels were built for (set by build.rs; empty without the
/// `cuda` feature).
pub fn built_archs() -> Vec<u32> {
    option_env!("BLACKMAMBA_CUDA_ARCHS")
        .and_then(|s| parse_archs(s).ok())
        .unwrap_or_default()
}

/// Parses an architecture list such as `80,86,89,90`, `sm_90` or `8.6`; sorted, deduplicated.
pub fn parse_archs(s: &str) -> Result<Vec<u32>, String> {
    let mut out = Vec::new();
    for item in s.split([',', ' ', ';']).map(str::trim).filter(|i| !i.is_empty()) {
        let digits: String = item
            .trim_start_matches("sm_")
            .trim_start_matches("compute_")
            .chars()
            .filter(|c| *c != '.')
            .collect();
        match digits.parse::<u32>() {
            Ok(a) if a >= MIN_ARCH => out.push(a),
            Ok(a) => {
                return Err(format!(
                    "BLACKMAMBA_KERNEL_ARCHS: sm_{a} is older than sm_{MIN_ARCH}, the oldest the kernels support (bf16, cp.async)"
                ))
            }
            Err(_) => {
                return Err(format!(
                    "BLACKMAMBA_KERNEL_ARCHS: '{item}' is not an architecture; use numbers such as 80,86,89,90"
                ))
            }
        }
    }
    if out.is_empty() {
        return Err("BLACKMAMBA_KERNEL_ARCHS is empty; use numbers such as 80,86,89,90".into());
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// The nvcc `-gencode` arguments of `archs`: SASS for each, and PTX of the newest (so that later
/// cards can compile it when they load the binary).
pub fn gencode_args(archs: &[u32]) -> Vec<String> {
    let mut out: Vec<String> = archs.iter().map(|a| format!("-gencode=arch=compute_{a},code=sm_{a}")).collect();
    if let Some(newest) = archs.iter().max() {
        out.push(format!("-gencode=arch=compute_{newest},code=compute_{newest}"));
    }
    out
}

/// The code a card will run out of a fat binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// Machine code built for this architecture.
    Sass(u32),
    /// PTX of this architecture, compiled by the driver when the binary is loaded (slower first
    /// start; features of newer architectures unused).
    Ptx(u32),
}

impl Code {
    /// The architecture of the code.
    pub fn arch(self) -> u32 {
        match self {
            Self::Sass(a) | Self::Ptx(a) => a,
        }
    }
}

/// Checks that a card (`name`, compute capability `(major, minor)`) can run kernels built for
/// `archs` (SASS for each, PTX of the newest), and says which code it will run. The error is one
/// line naming the card, its capability and the architectures built, with the fix.
pub fn check(name: &str, cc: (u32, u32), archs: &[u32]) -> Result<Code, String> {
    let dev = cc.0 * 10 + cc.1;
    let sass = archs.iter().copied().filter(|&a| a / 10 == cc.0 && a % 10 <= cc.1).max();
    if let Some(a) = sass {
        return Ok(Code::Sass(a));
    }
    if let Some(&ptx) = archs.iter().max() {
        if ptx <= dev {
            return Ok(Code::Ptx(ptx));
        }
    }
    let built = describe(archs);
    let fix = if dev < MIN_ARCH {
        format!(
            "the kernels need compute capability {}.{} or newer; use --device cpu",
            MIN_ARCH / 10,
            MIN_ARCH % 10
        )
    } else {
        format!("rebuild with BLACKMAMBA_KERNEL_ARCHS={dev} (unset, the default list covers sm_80 to sm_90), or use --device cpu")
    };
    Err(format!(
        "GPU '{name}' has compute capability {}.{}, but this build has kernels only for {built}; {fix}",
        cc.0, cc.1
    ))
}

/// Whether the Hopper-only launch features (programmatic dependent launch, bulk prefetch) may be
/// used: the card is sm_90 or newer and the code it runs was built for sm_90 or newer.
pub fn hopper_features(cc: (u32, u32), code: Code) -> bool {
    cc.0 * 10 + cc.1 >= HOPPER_ARCH && code.arch() >= HOPPER_ARCH
}

/// `sm_80, sm_86 (PTX compute_86)`-style text of an architecture list; `none` when empty.
pub fn describe(archs: &[u32]) -> String {
    match archs.iter().max() {
        None => "none".into(),
        Some(newest) => {
            let sass: Vec<String> = archs.iter().map(|a| format!("sm_{a}")).collect();
            format!("{} (PTX compute_{newest})", sass.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_build_is_fat_sass_for_ampere_ada_hopper_and_ptx_for_newer() {
        let args = gencode_args(DEFAULT_ARCHS);
        for a in [80, 86, 89, 90] {
            assert!(args.contains(&format!("-gencode=arch=compute_{a},code=sm_{a}")), "{args:?}");
        }
        assert_eq!(args.last().map(String::as_str), Some("-gencode=arch=compute_90,code=compute_90"));
        assert_eq!(args.len(), 5);
    }

    #[test]
    fn parse_accepts_lists_and_spellings_and_rejects_old_or_bad_ones() {
        assert_eq!(parse_archs("90,80, sm_86;8.9,90").unwrap(), vec![80, 86, 89, 90]);
        assert_eq!(parse_archs("90").unwrap(), vec![90]);
        let e = parse_archs("75").unwrap_err();
        assert!(e.contains("sm_75") && e.contains("sm_80"), "{e}");
        let e = parse_archs("hopper").unwrap_err();
        assert!(e.contains("'hopper'") && e.contains("BLACKMAMBA_KERNEL_ARCHS"), "{e}");
        assert!(parse_archs(" , ").is_err());
    }

    #[test]
    fn cards_pick_the_best_sass_of_their_major_version_else_ptx() {
        let all = DEFAULT_ARCHS;
        assert_eq!(check("A100", (8, 0), all), Ok(Code::Sass(80)));
        assert_eq!(check("A10", (8, 6), all), Ok(Code::Sass(86)));
        assert_eq!(check("Jetson Orin", (8, 7), all), Ok(Code::Sass(86)));
        assert_eq!(check("L4", (8, 9), all), Ok(Code::Sass(89)));
        assert_eq!(check("H100", (9, 0), all), Ok(Code::Sass(90)));
        assert_eq!(check("B200", (10, 0), all), Ok(Code::Ptx(90)));
        assert_eq!(check("RTX 5090", (12, 0), all), Ok(Code::Ptx(90)));
        // a Hopper-only build on an Ampere card: SASS of the wrong major, PTX too new
        assert_eq!(check("A100", (8, 0), &[90]).map_err(|_| ()), Err(()));
    }

    #[test]
    fn an_unsupported_card_gets_one_line_naming_it_the_archs_and_the_fix() {
        let e = check("Tesla T4", (7, 5), DEFAULT_ARCHS).unwrap_err();
        assert!(!e.contains('\n'));
        for want in [
            "'Tesla T4'",
            "7.5",
            "sm_80, sm_86, sm_89, sm_90",
            "PTX compute_90",
            "--device cpu",
            "8.0",
        ] {
            assert!(e.contains(want), "missing {want}: {e}");
        }
        let e = check("NVIDIA A100-SXM4-80GB", (8, 0), &[90]).unwrap_err();
        assert!(
            e.contains("'NVIDIA A100-SXM4-80GB'") && e.contains("BLACKMAMBA_KERNEL_ARCHS=80") && e.contains("sm_90"),
            "{e}"
        );
    }

    #[test]
    fn hopper_features_need_a_hopper_card_running_hopper_code() {
        assert!(hopper_features((9, 0), Code::Sass(90)));
        assert!(hopper_features((10, 0), Code::Ptx(90)));
        assert!(!hopper_features((8, 9), Code::Sass(89)));
        assert!(!hopper_features((9, 0), Code::Ptx(89)));
        assert!(!hopper_features((10, 0), Code::Ptx(89)));
    }

    #[test]
    fn describe_lists_sass_and_the_ptx() {
        assert_eq!(describe(&[80, 90]), "sm_80, sm_90 (PTX compute_90)");
        assert_eq!(describe(&[]), "none");
    }
}
