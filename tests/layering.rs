//! The crate's layout as a test: the GPU side's layers import only downwards
//! (`src/gpu/mod.rs` names them), passes never import each other, no import cycle joins
//! any of the crate's files (re-export hubs aside), and no file in `src/` grows past 550
//! lines. It reads the sources as text (comments removed) and follows every
//! `crate::`, `super::` and `self::` path, use trees included.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The GPU side's layers, bottom first: a file may name its own layer and those below.
const LEVELS: [&str; 6] = ["device", "kernels", "plan", "resources", "passes", "layer"];
/// The layer whose files must not name each other.
const PASSES: &str = "passes";
const MAX_LINES: usize = 550;

/// One source file: its module path (`["gpu", "layer", "training"]`), text without
/// comments, and whether it is a hub (a `mod.rs` or `lib.rs` holding only declarations
/// and re-exports).
struct SourceFile {
    path: String,
    module: Vec<String>,
    code: String,
    lines: usize,
    is_hub: bool,
}

fn source_tree(root: &Path) -> Vec<SourceFile> {
    let mut paths = Vec::new();
    collect_rs(root, &mut paths);
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
            let relative = path.strip_prefix(root).expect("under the root");
            source_file(&relative.to_string_lossy(), &text)
        })
        .collect()
}

fn collect_rs(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            collect_rs(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `relative`: the path under `src/` with `/` separators.
fn source_file(relative: &str, text: &str) -> SourceFile {
    let relative = relative.replace('\\', "/");
    let mut module: Vec<String> = relative
        .trim_end_matches(".rs")
        .split('/')
        .map(str::to_string)
        .collect();
    let is_mod = matches!(module.last().map(String::as_str), Some("mod" | "lib"));
    if is_mod {
        module.pop();
    }
    let code = without_comments(text);
    let defines_items = code
        .split(|c: char| !c.is_alphanumeric() && c != '_')
        .any(|word| {
            matches!(
                word,
                "fn" | "struct" | "enum" | "impl" | "trait" | "const" | "static"
            )
        });
    SourceFile {
        path: relative,
        module,
        lines: text.lines().count(),
        is_hub: is_mod && !defines_items,
        code,
    }
}

/// `text` without `//` comments (doc comments included); string literals are kept whole.
fn without_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let mut in_string = false;
        let mut previous = ' ';
        let mut cut = line.len();
        for (at, c) in line.char_indices() {
            match c {
                '"' if previous != '\\' => in_string = !in_string,
                '/' if !in_string && previous == '/' => {
                    cut = at - 1;
                    break;
                }
                _ => {}
            }
            previous = if previous == '\\' && c == '\\' {
                ' '
            } else {
                c
            };
        }
        out.push_str(&line[..cut]);
        out.push('\n');
    }
    out
}

/// Every path `code` names that starts with `crate`, `super` or `self`, use trees
/// expanded (`crate::a::{b, c::d}` gives `crate::a::b` and `crate::a::c::d`).
fn named_paths(code: &str) -> Vec<Vec<String>> {
    let chars: Vec<char> = code.chars().collect();
    let mut paths = Vec::new();
    let mut at = 0;
    while at < chars.len() {
        let starts_word = at == 0 || !is_ident_char(chars[at - 1]);
        if starts_word && is_ident_char(chars[at]) {
            let (word, end) = ident(&chars, at);
            if matches!(word.as_str(), "crate" | "super" | "self") && has_colons(&chars, end) {
                let mut tree = Vec::new();
                let end = use_tree(&chars, at, Vec::new(), &mut tree);
                paths.extend(tree);
                at = end.max(at + 1);
                continue;
            }
            at = end;
            continue;
        }
        at += 1;
    }
    paths
}

fn is_ident_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

fn ident(chars: &[char], from: usize) -> (String, usize) {
    let mut end = from;
    while end < chars.len() && is_ident_char(chars[end]) {
        end += 1;
    }
    (chars[from..end].iter().collect(), end)
}

fn skip_space(chars: &[char], mut at: usize) -> usize {
    while at < chars.len() && chars[at].is_whitespace() {
        at += 1;
    }
    at
}

fn has_colons(chars: &[char], at: usize) -> bool {
    let at = skip_space(chars, at);
    at + 1 < chars.len() && chars[at] == ':' && chars[at + 1] == ':'
}

/// Parses the path or use tree at `at` below `prefix` into `out`; returns where it ends.
fn use_tree(
    chars: &[char],
    mut at: usize,
    mut prefix: Vec<String>,
    out: &mut Vec<Vec<String>>,
) -> usize {
    loop {
        at = skip_space(chars, at);
        match chars.get(at) {
            Some('{') => {
                at += 1;
                loop {
                    at = skip_space(chars, at);
                    match chars.get(at) {
                        Some('}') => return at + 1,
                        Some(',') => at += 1,
                        Some(_) => {
                            let end = use_tree(chars, at, prefix.clone(), out);
                            if end == at {
                                return at;
                            }
                            at = end;
                        }
                        None => return at,
                    }
                }
            }
            Some('*') => {
                out.push(prefix);
                return at + 1;
            }
            Some(&c) if is_ident_char(c) => {
                let (word, end) = ident(chars, at);
                // `use a::{self, b}` names `a` itself.
                if word != "self" || prefix.is_empty() {
                    prefix.push(word);
                }
                if has_colons(chars, end) {
                    at = skip_space(chars, end) + 2;
                } else {
                    out.push(prefix);
                    return end;
                }
            }
            _ => {
                if !prefix.is_empty() {
                    out.push(prefix);
                }
                return at;
            }
        }
    }
}

/// The source tree as modules, with what each file names resolved to files.
struct Crate {
    files: Vec<SourceFile>,
    by_module: BTreeMap<Vec<String>, usize>,
}

impl Crate {
    fn new(files: Vec<SourceFile>) -> Self {
        let by_module = files
            .iter()
            .enumerate()
            .map(|(index, file)| (file.module.clone(), index))
            .collect();
        Crate { files, by_module }
    }

    /// The absolute module path `path` (named in `file`) stands for.
    fn absolute(&self, file: &SourceFile, path: &[String]) -> Vec<String> {
        let mut base = file.module.clone();
        let mut rest = path;
        match path.first().map(String::as_str) {
            Some("crate") => {
                base.clear();
                rest = &path[1..];
            }
            Some("self") => rest = &path[1..],
            _ => {}
        }
        while let Some("super") = rest.first().map(String::as_str) {
            base.pop();
            rest = &rest[1..];
        }
        base.extend(rest.iter().cloned());
        base
    }

    /// The file that defines the longest module prefix of `path`.
    fn file_of(&self, path: &[String]) -> Option<usize> {
        (0..=path.len())
            .rev()
            .find_map(|n| self.by_module.get(&path[..n]).copied())
    }

    /// For every file, the files its paths resolve to (itself left out), with the
    /// absolute path that led there.
    fn references(&self) -> Vec<Vec<(usize, Vec<String>)>> {
        self.files
            .iter()
            .enumerate()
            .map(|(index, file)| {
                let mut found: Vec<(usize, Vec<String>)> = Vec::new();
                for path in named_paths(&file.code) {
                    let absolute = self.absolute(file, &path);
                    if let Some(target) = self.file_of(&absolute) {
                        if target != index && !found.iter().any(|(t, _)| *t == target) {
                            found.push((target, absolute));
                        }
                    }
                }
                found
            })
            .collect()
    }
}

/// The layer of a module under `gpu` (`None`: not in a layer).
fn level(module: &[String]) -> Option<usize> {
    match module {
        [gpu, layer, ..] if gpu == "gpu" => LEVELS.iter().position(|l| l == layer),
        _ => None,
    }
}

/// Every import that points up a layer, sideways between passes, or into the GPU side
/// through its root hub, and every GPU file outside a layer.
fn layering_violations(krate: &Crate) -> Vec<String> {
    let mut violations = Vec::new();
    let references = krate.references();
    for (index, file) in krate.files.iter().enumerate() {
        let in_gpu = file.module.first().is_some_and(|m| m == "gpu");
        if !in_gpu || file.module.len() == 1 {
            continue;
        }
        let Some(source_level) = level(&file.module) else {
            violations.push(format!("{} is in none of the layers {LEVELS:?}", file.path));
            continue;
        };
        for (target, path) in &references[index] {
            let target_file = &krate.files[*target];
            let named = path.join("::");
            if target_file.module == ["gpu"] {
                violations.push(format!(
                    "{} names `{named}` through the GPU side's root hub: name its layer",
                    file.path
                ));
                continue;
            }
            let Some(target_level) = level(&target_file.module) else {
                continue;
            };
            if target_level > source_level {
                violations.push(format!(
                    "{} ({}) names `{named}` in {} ({}), a layer above it",
                    file.path, LEVELS[source_level], target_file.path, LEVELS[target_level]
                ));
            } else if LEVELS[source_level] == PASSES && target_level == source_level {
                violations.push(format!(
                    "{} names `{named}` in {}: passes never import each other",
                    file.path, target_file.path
                ));
            }
        }
    }
    violations
}

/// An import cycle among the files that are not hubs, as the files around it.
fn import_cycle(krate: &Crate) -> Option<Vec<String>> {
    let references = krate.references();
    let edges: Vec<Vec<usize>> = references
        .iter()
        .enumerate()
        .map(|(index, targets)| {
            if krate.files[index].is_hub {
                return Vec::new();
            }
            targets
                .iter()
                .map(|(t, _)| *t)
                .filter(|&t| !krate.files[t].is_hub)
                .collect()
        })
        .collect();
    // Depth-first search with colours: 0 unseen, 1 on the stack, 2 done.
    let mut colour = vec![0u8; edges.len()];
    let mut stack: Vec<usize> = Vec::new();
    fn visit(
        node: usize,
        edges: &[Vec<usize>],
        colour: &mut [u8],
        stack: &mut Vec<usize>,
    ) -> Option<Vec<usize>> {
        colour[node] = 1;
        stack.push(node);
        for &next in &edges[node] {
            if colour[next] == 1 {
                let from = stack.iter().position(|&n| n == next).unwrap_or(0);
                let mut cycle = stack[from..].to_vec();
                cycle.push(next);
                return Some(cycle);
            }
            if colour[next] == 0 {
                if let Some(cycle) = visit(next, edges, colour, stack) {
                    return Some(cycle);
                }
            }
        }
        stack.pop();
        colour[node] = 2;
        None
    }
    (0..edges.len()).find_map(|start| {
        if colour[start] != 0 {
            return None;
        }
        visit(start, &edges, &mut colour, &mut stack).map(|cycle| {
            cycle
                .into_iter()
                .map(|n| krate.files[n].path.clone())
                .collect()
        })
    })
}

fn crate_sources() -> Crate {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    Crate::new(source_tree(&root))
}

#[test]
fn gpu_layers_import_only_downwards() {
    let krate = crate_sources();
    let layered = krate
        .files
        .iter()
        .filter(|f| level(&f.module).is_some())
        .count();
    // Every layer has files, so the check below has something to check.
    for name in LEVELS {
        assert!(
            krate
                .files
                .iter()
                .any(|f| level(&f.module) == LEVELS.iter().position(|l| *l == name)),
            "no file in src/gpu/{name}/"
        );
    }
    let violations = layering_violations(&krate);
    assert!(
        violations.is_empty(),
        "{} of {layered} layered files break the layering:\n{}",
        violations.len(),
        violations.join("\n")
    );
}

#[test]
fn no_import_cycle_joins_the_crates_files() {
    let krate = crate_sources();
    let edges: usize = krate.references().iter().map(Vec::len).sum();
    assert!(
        edges > 100,
        "only {edges} imports found: the reader is broken"
    );
    if let Some(cycle) = import_cycle(&krate) {
        panic!("import cycle: {}", cycle.join(" -> "));
    }
}

#[test]
fn no_source_file_is_past_the_line_limit() {
    let long: Vec<String> = crate_sources()
        .files
        .iter()
        .filter(|f| f.lines > MAX_LINES)
        .map(|f| format!("{} ({} lines)", f.path, f.lines))
        .collect();
    assert!(
        long.is_empty(),
        "past {MAX_LINES} lines (split them by responsibility): {}",
        long.join(", ")
    );
}

// The checker itself, on small trees that break each rule.

fn tree(files: &[(&str, &str)]) -> Crate {
    Crate::new(
        files
            .iter()
            .map(|(path, text)| source_file(path, text))
            .collect(),
    )
}

#[test]
fn the_checker_finds_an_upward_import() {
    let krate = tree(&[
        ("gpu/mod.rs", "pub mod device;\npub mod layer;\n"),
        (
            "gpu/device/context.rs",
            "use crate::gpu::layer::moe_layer::MoeLayer;\nfn f() {}\n",
        ),
        ("gpu/layer/moe_layer.rs", "pub struct MoeLayer;\n"),
    ]);
    let violations = layering_violations(&krate);
    assert_eq!(violations.len(), 1, "{violations:?}");
    assert!(violations[0].contains("a layer above it"), "{violations:?}");
}

#[test]
fn the_checker_finds_passes_naming_each_other_in_use_trees_and_super_paths() {
    let krate = tree(&[
        (
            "gpu/passes/backward.rs",
            "use crate::gpu::{device::encode::dispatch, passes::forward::{self, encode}};\n",
        ),
        (
            "gpu/passes/refresh.rs",
            "fn f() { super::forward::encode(); }\n",
        ),
        ("gpu/passes/forward.rs", "pub fn encode() {}\n"),
        ("gpu/device/encode.rs", "pub fn dispatch() {}\n"),
    ]);
    let violations = layering_violations(&krate);
    assert_eq!(violations.len(), 2, "{violations:?}");
    assert!(violations
        .iter()
        .all(|v| v.contains("passes never import each other")));
}

#[test]
fn the_checker_finds_imports_through_the_root_hub_and_files_outside_a_layer() {
    let krate = tree(&[
        ("gpu/mod.rs", "pub use layer::MoeLayer;\n"),
        ("gpu/plan/forward.rs", "use crate::gpu::MoeLayer;\n"),
        ("gpu/helpers.rs", "pub fn f() {}\n"),
    ]);
    let violations = layering_violations(&krate);
    assert_eq!(violations.len(), 2, "{violations:?}");
}

#[test]
fn the_checker_finds_a_cycle_but_not_through_a_hub_or_a_comment() {
    let krate = tree(&[
        ("lib.rs", "pub mod a;\npub mod b;\npub use a::A;\n"),
        ("a.rs", "use crate::b::B;\npub struct A;\n"),
        (
            "b.rs",
            "// use crate::a::A;\npub struct B; fn f() -> crate::A {}\n",
        ),
    ]);
    assert_eq!(import_cycle(&krate), None);
    let krate = tree(&[
        ("a.rs", "use crate::b::B;\npub struct A;\n"),
        ("b.rs", "use crate::c::{C};\npub struct B;\n"),
        (
            "c/mod.rs",
            "pub struct C; fn g() { let _ = crate::a::A; }\n",
        ),
    ]);
    let cycle = import_cycle(&krate).expect("a -> b -> c -> a");
    assert_eq!(cycle.len(), 4, "{cycle:?}");
}
