//! The engine boundary: the pure modules import nothing that does I/O.

use std::path::Path;

/// Crates and modules the pure engine must never use.
const FORBIDDEN: &[&str] = &[
    "kube",
    "rtnetlink",
    "netlink_packet_route",
    "wireguard_control",
    "tokio",
    "std::fs",
    "std::net::UdpSocket",
    "std::process",
    "std::time::SystemTime",
];

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read dir") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn engine_modules_import_no_io_crates() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&root.join("topology"), &mut files);
    files.push(root.join("desired.rs"));
    files.push(root.join("model.rs"));
    assert!(files.len() >= 5, "engine files found: {files:?}");
    for f in files {
        let text = std::fs::read_to_string(&f).expect("read");
        for line in text.lines().map(str::trim) {
            if line.starts_with("//") {
                continue;
            }
            for bad in FORBIDDEN {
                let uses = line.contains(&format!("use {bad}"))
                    || line.contains(&format!("{bad}::"))
                    || line.contains(&format!("extern crate {bad}"));
                assert!(!uses, "{} uses {bad}: {line}", f.display());
            }
        }
    }
}
