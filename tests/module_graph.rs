//! The import graph between top-level modules (`src/<top>.rs` or `src/<top>/`) has no circle.
//!
//! It reads the sources, not the compiler: every `crate::<top>` path (in `use` lines, grouped
//! `use crate::{a, b::c}` forms and inline paths) and every `super::` chain that climbs to the
//! crate root is an edge from the file's top-level module to `<top>`. Comments, doc comments,
//! strings and char literals are left out. `lib.rs` and `main.rs` are the roots and may import
//! anything; `fuzzing.rs` is a leaf for the fuzz targets: it may import anything, and nothing may
//! import it. The intended layering, low to high, is in `src/lib.rs`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};

/// Where an edge was first seen: `src/path.rs:line`.
type Graph = BTreeMap<String, BTreeMap<String, String>>;

/// The source with comments, strings and char literals blanked (newlines kept, so line numbers
/// stay right).
fn strip(src: &str) -> String {
    let c: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let ident = |ch: char| ch.is_alphanumeric() || ch == '_';
    let blank = |out: &mut String, s: &[char]| {
        for &ch in s {
            out.push(if ch == '\n' { '\n' } else { ' ' });
        }
    };
    let mut i = 0;
    while i < c.len() {
        let prev_ident = i > 0 && ident(c[i - 1]);
        if c[i] == '/' && c.get(i + 1) == Some(&'/') {
            let end = c[i..]
                .iter()
                .position(|&ch| ch == '\n')
                .map_or(c.len(), |p| i + p);
            blank(&mut out, &c[i..end]);
            i = end;
        } else if c[i] == '/' && c.get(i + 1) == Some(&'*') {
            let (mut j, mut depth) = (i + 2, 1);
            while j < c.len() && depth > 0 {
                if c[j] == '/' && c.get(j + 1) == Some(&'*') {
                    depth += 1;
                    j += 2;
                } else if c[j] == '*' && c.get(j + 1) == Some(&'/') {
                    depth -= 1;
                    j += 2;
                } else {
                    j += 1;
                }
            }
            blank(&mut out, &c[i..j.min(c.len())]);
            i = j;
        } else if !prev_ident && (c[i] == 'r' || (c[i] == 'b' && c.get(i + 1) == Some(&'r'))) && {
            let r = if c[i] == 'b' { i + 1 } else { i };
            let hashes = c[r + 1..].iter().take_while(|&&ch| ch == '#').count();
            c.get(r + 1 + hashes) == Some(&'"')
        } {
            // A raw string: r"…", r#"…"#, br"…".
            let r = if c[i] == 'b' { i + 1 } else { i };
            let hashes = c[r + 1..].iter().take_while(|&&ch| ch == '#').count();
            let mut j = r + 2 + hashes;
            while j < c.len() {
                if c[j] == '"'
                    && c[j + 1..]
                        .iter()
                        .take(hashes)
                        .filter(|&&ch| ch == '#')
                        .count()
                        == hashes
                {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            blank(&mut out, &c[i..j.min(c.len())]);
            i = j;
        } else if c[i] == '"' {
            let mut j = i + 1;
            while j < c.len() && c[j] != '"' {
                j += if c[j] == '\\' { 2 } else { 1 };
            }
            blank(&mut out, &c[i..(j + 1).min(c.len())]);
            i = j + 1;
        } else if c[i] == '\'' && c.get(i + 1) == Some(&'\\') {
            // An escaped char literal: '\n', '\'', '\u{1F600}'.
            let end = c[i + 2..]
                .iter()
                .position(|&ch| ch == '\'')
                .map_or(c.len(), |p| i + 3 + p);
            blank(&mut out, &c[i..end.min(c.len())]);
            i = end;
        } else if c[i] == '\'' && c.get(i + 2) == Some(&'\'') {
            blank(&mut out, &c[i..i + 3]);
            i += 3;
        } else {
            // Lifetimes ('a) fall through here and stay as they are.
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

#[derive(Debug, PartialEq)]
enum Tok {
    Ident(String),
    Path,
    Open,
    Close,
    Comma,
    Other,
}

fn tokens(stripped: &str) -> Vec<(Tok, usize)> {
    let c: Vec<char> = stripped.chars().collect();
    let mut out = Vec::new();
    let (mut i, mut line) = (0, 1);
    while i < c.len() {
        let ch = c[i];
        if ch == '\n' {
            line += 1;
            i += 1;
        } else if ch.is_whitespace() {
            i += 1;
        } else if ch.is_alphabetic() || ch == '_' {
            let start = i;
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                i += 1;
            }
            out.push((Tok::Ident(c[start..i].iter().collect()), line));
        } else if ch == ':' && c.get(i + 1) == Some(&':') {
            out.push((Tok::Path, line));
            i += 2;
        } else {
            out.push((
                match ch {
                    '{' => Tok::Open,
                    '}' => Tok::Close,
                    ',' => Tok::Comma,
                    _ => Tok::Other,
                },
                line,
            ));
            i += 1;
        }
    }
    out
}

fn is(t: Option<&(Tok, usize)>, want: &Tok) -> bool {
    t.is_some_and(|(t, _)| t == want)
}

fn ident(t: Option<&(Tok, usize)>) -> Option<&str> {
    match t {
        Some((Tok::Ident(s), _)) => Some(s),
        _ => None,
    }
}

/// The top-level modules a file names, with the line of each. `depth` is how deep the file's
/// module is below the crate root: 1 for `src/a.rs` and `src/a/mod.rs`, 2 for `src/a/b.rs`.
fn references(src: &str, depth: usize) -> Vec<(String, usize)> {
    let toks = tokens(&strip(src));
    let mut found = Vec::new();
    // The brace depths at which inline `mod name { … }` blocks opened.
    let mut inline: Vec<usize> = Vec::new();
    let mut braces = 0;
    let mut i = 0;
    while i < toks.len() {
        let (t, line) = &toks[i];
        match t {
            Tok::Open => braces += 1,
            Tok::Close => {
                if inline.last() == Some(&braces) {
                    inline.pop();
                }
                braces -= 1;
            }
            Tok::Ident(w)
                if w == "mod"
                    && ident(toks.get(i + 1)).is_some()
                    && is(toks.get(i + 2), &Tok::Open) =>
            {
                inline.push(braces + 1);
            }
            Tok::Ident(w) if (w == "crate" || w == "super") && is(toks.get(i + 1), &Tok::Path) => {
                let after_path = i > 0 && is(toks.get(i - 1), &Tok::Path);
                let mut j = i;
                let at_root = if w == "crate" {
                    j = i + 2;
                    true
                } else {
                    let mut up = 0;
                    while ident(toks.get(j)) == Some("super") && is(toks.get(j + 1), &Tok::Path) {
                        up += 1;
                        j += 2;
                    }
                    up == depth + inline.len()
                };
                if at_root && !after_path {
                    match toks.get(j) {
                        Some((Tok::Ident(top), _)) => found.push((top.clone(), *line)),
                        Some((Tok::Open, _)) => {
                            // A group: the first name of each item at its own level.
                            let mut level = 0;
                            let mut first = true;
                            for (t, l) in &toks[j..] {
                                match t {
                                    Tok::Open => {
                                        level += 1;
                                        continue;
                                    }
                                    Tok::Close => {
                                        level -= 1;
                                        if level == 0 {
                                            break;
                                        }
                                    }
                                    Tok::Comma if level == 1 => {
                                        first = true;
                                        continue;
                                    }
                                    Tok::Ident(top) if level == 1 && first => {
                                        found.push((top.clone(), *l));
                                    }
                                    _ => {}
                                }
                                first = false;
                            }
                        }
                        _ => {}
                    }
                }
                i = j;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    found
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("read src/")
        .map(|e| e.expect("dir entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// The graph of `src/`: top-level module → module it names → where.
fn crate_graph(src: &Path) -> Graph {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut tops = BTreeSet::new();
    let mut owned = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(src).expect("under src/");
        let parts: Vec<String> = rel
            .iter()
            .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
            .collect();
        if parts.len() == 1 && (parts[0] == "lib" || parts[0] == "main") {
            continue;
        }
        let top = parts[0].clone();
        let depth = parts.len() - usize::from(parts.last().is_some_and(|p| p == "mod"));
        tops.insert(top.clone());
        owned.push((top, depth, f.clone(), rel.display().to_string()));
    }
    let mut graph: Graph = tops.iter().map(|t| (t.clone(), BTreeMap::new())).collect();
    for (top, depth, path, rel) in owned {
        let text = std::fs::read_to_string(&path).expect("read a source file");
        for (to, line) in references(&text, depth.max(1)) {
            if to != top && tops.contains(&to) {
                graph
                    .get_mut(&top)
                    .expect("every top is in the graph")
                    .entry(to)
                    .or_insert_with(|| format!("src/{rel}:{line}"));
            }
        }
    }
    graph
}

/// The shortest circle through `n` (breadth first), the modules in order with `n` at both ends.
fn circle_through(graph: &Graph, n: &String) -> Option<Vec<String>> {
    let mut back: BTreeMap<&String, &String> = BTreeMap::new();
    let mut queue = VecDeque::from([n]);
    while let Some(cur) = queue.pop_front() {
        for next in graph[cur].keys() {
            if next == n {
                let mut path = vec![n.clone()];
                let mut at = cur;
                while at != n {
                    path.push(at.clone());
                    at = back[at];
                }
                path.push(n.clone());
                path.reverse();
                return Some(path);
            }
            if !back.contains_key(next) {
                back.insert(next, cur);
                queue.push_back(next);
            }
        }
    }
    None
}

/// The circles in the graph: the shortest one through each module that is on one, each turned
/// to start at its least module, without repeats.
fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    let mut out: Vec<Vec<String>> = Vec::new();
    for n in graph.keys() {
        if let Some(mut c) = circle_through(graph, n) {
            c.pop();
            let least = (0..c.len()).min_by_key(|&i| &c[i]).unwrap_or(0);
            c.rotate_left(least);
            c.push(c[0].clone());
            if !out.contains(&c) {
                out.push(c);
            }
        }
    }
    out
}

#[test]
fn no_circle_between_top_level_modules() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph = crate_graph(&src);
    let mut problems = Vec::new();
    for (from, to) in &graph {
        if let Some(at) = to.get("fuzzing") {
            problems.push(format!(
                "{from} imports fuzzing ({at}); fuzzing is for fuzz targets only"
            ));
        }
    }
    // fuzzing may import anything: its edges cannot close a circle that matters.
    graph.insert("fuzzing".into(), BTreeMap::new());
    for c in cycles(&graph) {
        let steps: Vec<String> = c
            .windows(2)
            .map(|w| format!("  {} -> {} ({})", w[0], w[1], graph[&w[0]][&w[1]]))
            .collect();
        problems.push(format!("circle {}:\n{}", c.join(" -> "), steps.join("\n")));
    }
    assert!(
        problems.is_empty(),
        "the top-level modules import each other in a circle; see the layering in src/lib.rs\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_circle_finder_finds_circles() {
    let g = |edges: &[(&str, &str)]| -> Graph {
        let mut g = Graph::new();
        for (a, b) in edges {
            g.entry(a.to_string())
                .or_default()
                .insert(b.to_string(), String::new());
            g.entry(b.to_string()).or_default();
        }
        g
    };
    let v = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert!(cycles(&g(&[("a", "b"), ("b", "c"), ("a", "c")])).is_empty());
    assert_eq!(
        cycles(&g(&[("a", "b"), ("b", "a")])),
        vec![v(&["a", "b", "a"])]
    );
    // Two separate sets of circles; the shortest circle through each module, once.
    assert_eq!(
        cycles(&g(&[
            ("a", "b"),
            ("b", "c"),
            ("c", "a"),
            ("b", "a"),
            ("d", "e"),
            ("e", "f"),
            ("f", "d"),
            ("c", "d"),
        ])),
        vec![
            v(&["a", "b", "a"]),
            v(&["a", "b", "c", "a"]),
            v(&["d", "e", "f", "d"])
        ]
    );
}

#[test]
fn references_reads_paths_not_comments_or_strings() {
    let src = r##"
        //! See [`crate::doc_link`].
        use crate::plain::Thing;
        use crate::{grouped, nested::{deep, deeper}, other::Item as Renamed};
        // use crate::line_comment;
        /* use crate::block /* nested */ comment; */
        pub(crate) fn f<'a>(x: &'a str) -> char {
            let _ = "crate::in_string";
            let _ = r#"crate::in_raw "string""#;
            let _ = crate::inline::call(x);
            let _ = super::super::climbed::X;
            let _ = super::sibling::Y;
            '"'
        }
        mod tests {
            use super::super::still_below_root;
            use super::super::super::from_tests::Z;
        }
    "##;
    let names: BTreeSet<String> = references(src, 2).into_iter().map(|(n, _)| n).collect();
    let want: BTreeSet<String> = [
        "plain",
        "grouped",
        "nested",
        "other",
        "inline",
        "climbed",
        "from_tests",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(names, want);
}
