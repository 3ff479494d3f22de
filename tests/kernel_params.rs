//! The kernels' launch parameters agree on both sides: every struct of `kernels/params.cuh` has a
//! Rust twin in `blackmamba::ops::params` (and back) with the same field names in the same order,
//! the same C types, Rust types of the matching size, and the offsets and size that the C layout
//! rules give (natural alignment, tail padding to the struct's alignment). Runs without a GPU.

use blackmamba::ops::params::{all, StructLayout};

/// One field of a C struct: its type (without `__restrict__`, spaces normalised) and name.
#[derive(Debug, Clone)]
struct CField {
    ty: String,
    name: String,
}

#[derive(Debug, Clone)]
struct CStruct {
    name: String,
    fields: Vec<CField>,
}

/// Parses the forms `kernels/params.cuh` allows (see its head); any other line is an error naming
/// it, so a field written in a form this parser would skip cannot go unchecked.
fn parse(src: &str) -> Result<Vec<CStruct>, String> {
    let mut out = Vec::new();
    let mut cur: Option<CStruct> = None;
    for (i, raw) in src.lines().enumerate() {
        let line = raw.split("//").next().unwrap_or("").trim();
        let at = || format!("kernels/params.cuh:{}: `{}`", i + 1, raw.trim());
        if line.is_empty() {
            continue;
        }
        if let Some(s) = cur.as_mut() {
            if line == "};" {
                out.extend(cur.take());
                continue;
            }
            let body = line
                .strip_suffix(';')
                .ok_or_else(|| format!("{}: a field must end with `;`", at()))?;
            let body = body.replace("__restrict__", " ").replace('*', "* ");
            let words: Vec<&str> = body.split_whitespace().collect();
            let (name, ty) = words.split_last().ok_or_else(|| format!("{}: empty field", at()))?;
            if ty.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("{}: expected `TYPE NAME;` (one field a line)", at()));
            }
            let ty = ty.join(" ").replace(" *", "*");
            if !ty.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '*' || c == ' ') {
                return Err(format!("{}: expected `TYPE NAME;` (one field a line)", at()));
            }
            s.fields.push(CField {
                ty: ty.trim_end().to_string(),
                name: name.to_string(),
            });
            continue;
        }
        let forward = line.strip_prefix("struct ").and_then(|d| d.strip_suffix(';'));
        if line == "#pragma once" || forward.is_some_and(|n| n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')) {
            continue;
        }
        let decl = match line.strip_prefix("template <") {
            Some(rest) => rest
                .split_once("> ")
                .map(|(_, d)| d)
                .ok_or_else(|| format!("{}: bad template head", at()))?,
            None => line,
        };
        let name = decl
            .strip_prefix("struct ")
            .and_then(|d| d.strip_suffix(" {"))
            .ok_or_else(|| format!("{}: expected `struct NAME {{`", at()))?;
        cur = Some(CStruct {
            name: name.to_string(),
            fields: Vec::new(),
        });
    }
    match cur {
        Some(s) => Err(format!("kernels/params.cuh: struct {} is not closed", s.name)),
        None => Ok(out),
    }
}

/// (size, align) of a C type, and the Rust type that must stand for it; `structs` are the
/// structs declared above the field.
fn c_type(ty: &str, structs: &[(String, usize, usize)]) -> Option<(usize, usize, String)> {
    if ty.ends_with('*') {
        return Some((8, 8, "u64".into()));
    }
    let prim = match ty {
        "int" => (4, 4, "i32"),
        "unsigned int" => (4, 4, "u32"),
        "float" => (4, 4, "f32"),
        "double" => (8, 8, "f64"),
        "long long" => (8, 8, "i64"),
        "unsigned long long" => (8, 8, "u64"),
        _ => {
            let (n, size, align) = structs.iter().find(|(n, ..)| n == ty)?;
            return Some((*size, *align, n.clone()));
        }
    };
    Some((prim.0, prim.1, prim.2.into()))
}

/// Every disagreement between the C structs and the Rust ones, one line each.
fn compare(c: &[CStruct], rust: &[StructLayout]) -> Vec<String> {
    let mut errs = Vec::new();
    let mut done: Vec<(String, usize, usize)> = Vec::new();
    for cs in c {
        let Some(rs) = rust.iter().find(|r| r.name == cs.name) else {
            errs.push(format!("{}: in kernels/params.cuh but not in src/ops/params/", cs.name));
            continue;
        };
        if cs.fields.len() != rs.fields.len() {
            errs.push(format!("{}: {} fields in C, {} in Rust", cs.name, cs.fields.len(), rs.fields.len()));
        }
        let (mut off, mut align) = (0usize, 1usize);
        for (i, cf) in cs.fields.iter().enumerate() {
            let Some((size, a, want_rust)) = c_type(&cf.ty, &done) else {
                errs.push(format!("{}.{}: unknown C type `{}`", cs.name, cf.name, cf.ty));
                break;
            };
            off = off.next_multiple_of(a);
            align = align.max(a);
            match rs.fields.get(i) {
                None => errs.push(format!("{}.{}: field {i} is in C only", cs.name, cf.name)),
                Some(rf) => {
                    if rf.name != cf.name || rf.c_type != cf.ty {
                        errs.push(format!(
                            "{}: field {i} is `{} {}` in C but `{} {}` in Rust",
                            cs.name, cf.ty, cf.name, rf.c_type, rf.name
                        ));
                    }
                    if rf.rust_type != want_rust || rf.size != size || rf.offset != off {
                        errs.push(format!(
                            "{}.{}: C `{}` at offset {off} ({size} bytes) wants Rust `{want_rust}`, got `{}` at {} ({} bytes)",
                            cs.name, cf.name, cf.ty, rf.rust_type, rf.offset, rf.size
                        ));
                    }
                }
            }
            off += size;
        }
        for (i, rf) in rs.fields.iter().enumerate().skip(cs.fields.len()) {
            errs.push(format!("{}.{}: field {i} is in Rust only", cs.name, rf.name));
        }
        let size = off.next_multiple_of(align);
        if rs.size != size || rs.align != align {
            errs.push(format!(
                "{}: C size {size} align {align}, Rust size {} align {}",
                cs.name, rs.size, rs.align
            ));
        }
        done.push((cs.name.clone(), size, align));
    }
    for rs in rust {
        if !c.iter().any(|cs| cs.name == rs.name) {
            errs.push(format!("{}: in src/ops/params/ but not in kernels/params.cuh", rs.name));
        }
    }
    errs
}

fn header() -> String {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels/params.cuh");
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn every_params_struct_matches_its_c_twin() {
    let c = parse(&header()).unwrap();
    let rust = all();
    assert!(!c.is_empty() && !rust.is_empty());
    let errs = compare(&c, &rust);
    assert!(
        errs.is_empty(),
        "kernels/params.cuh and src/ops/params/ disagree:\n{}",
        errs.join("\n")
    );
}

#[test]
fn struct_names_are_unique_on_both_sides() {
    let c = parse(&header()).unwrap();
    let mut names: Vec<&str> = c.iter().map(|s| s.name.as_str()).collect();
    names.sort_unstable();
    let n = names.len();
    names.dedup();
    assert_eq!(names.len(), n, "a struct is declared twice in kernels/params.cuh");
    let rust = all();
    let mut names: Vec<&str> = rust.iter().map(|s| s.name).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), rust.len(), "a struct is declared twice in src/ops/params/");
}

/// The comparison itself catches a field added, dropped, retyped or reordered on one side (the
/// header and the Rust list are edited in memory, never on disk).
#[test]
fn a_one_sided_change_is_caught() {
    let src = header();
    let rust = all();
    let c = parse(&src).unwrap();
    let victim = c.iter().find(|s| s.fields.len() >= 2).unwrap().clone();
    let with = |f: &dyn Fn(&mut CStruct)| {
        let mut c2 = c.clone();
        let s = c2.iter_mut().find(|s| s.name == victim.name).unwrap();
        f(s);
        compare(&c2, &rust)
    };
    // a field added in C only
    let errs = with(&|s| {
        s.fields.push(CField {
            ty: "int".into(),
            name: "extra".into(),
        })
    });
    assert!(errs.iter().any(|e| e.contains("extra") && e.contains("C only")), "{errs:?}");
    // a field dropped in C (so the Rust one is extra)
    let errs = with(&|s| {
        s.fields.pop();
    });
    assert!(errs.iter().any(|e| e.contains("Rust only")), "{errs:?}");
    // two fields swapped
    let errs = with(&|s| s.fields.swap(0, 1));
    assert!(!errs.is_empty());
    // a type changed (same size: a pointer's pointee)
    let errs = with(&|s| s.fields[0].ty = "const char*".into());
    assert!(errs.iter().any(|e| e.contains("const char*")), "{errs:?}");
    // a Rust field dropped
    let mut r2 = rust.clone();
    let rs = r2.iter_mut().find(|s| s.name == victim.name).unwrap();
    rs.fields = &rs.fields[..rs.fields.len() - 1];
    let errs = compare(&c, &r2);
    assert!(errs.iter().any(|e| e.contains("C only")), "{errs:?}");
    // a whole struct on one side only
    let errs = compare(&c, &rust[1..]);
    assert!(errs.iter().any(|e| e.contains("not in src/ops/params/")), "{errs:?}");
}

#[test]
fn the_parser_refuses_forms_it_would_misread() {
    for bad in [
        "struct A {\n    int a, b;\n};\n",
        "struct A {\n    int a;\n",
        "struct A { int a; };\n",
        "typedef struct {\n    int a;\n} A;\n",
    ] {
        assert!(parse(bad).is_err(), "accepted: {bad}");
    }
    let ok = parse("template <typename T> struct A {\n    const T* __restrict__ x;  // c\n    unsigned long long n;\n};\n").unwrap();
    assert_eq!(ok[0].fields[0].ty, "const T*");
    assert_eq!(ok[0].fields[0].name, "x");
    assert_eq!(ok[0].fields[1].ty, "unsigned long long");
}
