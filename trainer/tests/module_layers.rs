//! The crates' top-level modules form layers: no module reaches, through `crate::` paths, a
//! module that reaches it back (the README's layout section draws the layers). Test modules
//! (`#[cfg(test)] mod …`) may reach anything and are left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The source without its test modules and comments.
fn library_code(text: &str) -> String {
    let mut code = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let t = line.trim_start();
        if t.starts_with("#[cfg(test)]") && lines.peek().is_some_and(|next| next.trim_start().starts_with("mod ")) {
            // Test modules sit at the end of a file in this code base.
            break;
        }
        if !t.starts_with("//") {
            code.push_str(line);
            code.push('\n');
        }
    }
    code
}

fn ident(s: &str) -> String {
    s.trim_start().chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect()
}

/// The top-level modules `code` names through `crate::a…` and `crate::{a…, b…}`.
fn referenced(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(list) = rest.strip_prefix('{') {
            // The first path segment of each item at brace depth 1.
            let (mut depth, mut start) = (1, 0);
            for (j, c) in list.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 1 => {
                        out.insert(ident(&list[start..j]));
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 1 => {
                        out.insert(ident(&list[start..j]));
                        start = j + 1;
                    }
                    _ => {}
                }
            }
        } else {
            out.insert(ident(rest));
        }
    }
    out.retain(|m| !m.is_empty() && m.chars().next().is_some_and(|c| c.is_ascii_lowercase()));
    out
}

/// Top-level module → the top-level modules its library code uses.
fn module_graph(src: &Path) -> Graph {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut graph = Graph::new();
    for file in files {
        let rel = file.strip_prefix(src).unwrap();
        let first = rel.components().next().unwrap().as_os_str().to_string_lossy().into_owned();
        let module = first.trim_end_matches(".rs").to_string();
        if module == "lib" || module == "main" {
            continue;
        }
        let uses = referenced(&library_code(&std::fs::read_to_string(&file).unwrap()));
        let entry = graph.entry(module.clone()).or_default();
        entry.extend(uses.into_iter().filter(|m| *m != module));
    }
    let modules: BTreeSet<String> = graph.keys().cloned().collect();
    for uses in graph.values_mut() {
        uses.retain(|m| modules.contains(m));
    }
    graph
}

/// A cycle of the graph, if it has one.
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(m: &str, graph: &Graph, state: &mut BTreeMap<String, u8>, path: &mut Vec<String>) -> Option<Vec<String>> {
        match state.get(m) {
            Some(1) => {
                let from = path.iter().position(|p| p == m).unwrap();
                let mut cycle = path[from..].to_vec();
                cycle.push(m.to_string());
                return Some(cycle);
            }
            Some(_) => return None,
            None => {}
        }
        state.insert(m.to_string(), 1);
        path.push(m.to_string());
        for next in &graph[m] {
            if let Some(c) = visit(next, graph, state, path) {
                return Some(c);
            }
        }
        path.pop();
        state.insert(m.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    graph.keys().find_map(|m| visit(m, graph, &mut state, &mut Vec::new()))
}

/// The layers, lowest first: each module in the first layer above everything it uses.
fn layers(graph: &Graph) -> Vec<Vec<String>> {
    let mut level: BTreeMap<&str, usize> = BTreeMap::new();
    while level.len() < graph.len() {
        for (m, uses) in graph {
            if !level.contains_key(m.as_str()) && uses.iter().all(|u| level.contains_key(u.as_str())) {
                let l = uses.iter().map(|u| level[u.as_str()] + 1).max().unwrap_or(0);
                level.insert(m, l);
            }
        }
    }
    let mut out = vec![Vec::new(); level.values().max().map_or(0, |l| l + 1)];
    for (m, l) in level {
        out[l].push(m.to_string());
    }
    out
}

fn check(crate_dir: &str) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(crate_dir).join("src");
    let graph = module_graph(&src);
    assert!(graph.len() > 3, "no modules found under {}", src.display());
    if let Some(cycle) = find_cycle(&graph) {
        panic!("{crate_dir}: module cycle {}", cycle.join(" → "));
    }
    for (i, layer) in layers(&graph).iter().enumerate() {
        eprintln!("{crate_dir} layer {i}: {}", layer.join(", "));
    }
}

#[test]
fn trainer_modules_form_layers() {
    check("trainer");
}

#[test]
fn collectives_modules_form_layers() {
    check("collectives");
}

#[test]
fn the_checker_finds_a_cycle() {
    let code =
        "use crate::{b::X, c};\nfn f() { crate::d::g(); }\n// crate::e\n#[cfg(test)]\nmod tests { use crate::f; }\n";
    let uses = referenced(&library_code(code));
    assert_eq!(uses.into_iter().collect::<Vec<_>>(), ["b", "c", "d"]);
    let mut g = Graph::new();
    g.insert("a".into(), ["b".to_string()].into());
    g.insert("b".into(), ["c".to_string()].into());
    g.insert("c".into(), ["a".to_string()].into());
    assert_eq!(find_cycle(&g).unwrap(), ["a", "b", "c", "a"]);
    g.get_mut("c").unwrap().clear();
    assert!(find_cycle(&g).is_none());
    assert_eq!(layers(&g), [vec!["c".to_string()], vec!["b".to_string()], vec!["a".to_string()]]);
}
