//! `meshctl`'s global flags before and after the subcommand, and its shell completion scripts,
//! through the real binary.

use std::process::{Command, Output};

const THREE_CLOUDS: &str = "examples/three-clouds.yaml";

fn meshctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("KUBECONFIG")
        .env_remove("RUST_LOG")
        .output()
        .expect("run meshctl")
}

/// The stdout of a successful run.
fn stdout(args: &[&str]) -> Vec<u8> {
    let o = meshctl(args);
    assert!(
        o.status.success(),
        "meshctl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!o.stdout.is_empty(), "meshctl {args:?} printed nothing");
    o.stdout
}

#[test]
fn global_flags_before_or_after_the_subcommand_print_the_same_bytes() {
    let nodes = ["--nodes", THREE_CLOUDS];
    for (command, rest, globals) in [
        (&["plan"][..], &["--node", "fra-1"][..], &["-o", "json"][..]),
        (
            &["plan"],
            &["--node", "par-1"],
            &["--granularity", "location"],
        ),
        (
            &["showconf"],
            &["node", "fra-1"],
            &["--subnet", "10.9.0.0/16"],
        ),
        (
            &["showconf"],
            &["node", "hel-1", "--as-peer"],
            &["-o", "yaml"],
        ),
        (
            &["graph"],
            &["--node", "hel-1"],
            &["--granularity", "location"],
        ),
    ] {
        let after = stdout(&[command, rest, &nodes, globals].concat());
        for args in [
            [&nodes, globals, command, rest].concat(),
            [&nodes, command, globals, rest].concat(),
            [globals, command, rest, &nodes].concat(),
        ] {
            assert!(
                stdout(&args) == after,
                "meshctl {args:?} differs from meshctl {command:?} {rest:?} with the flags after"
            );
        }
        // The flags took effect: without the global ones the output differs.
        assert!(
            stdout(&[command, rest, &nodes].concat()) != after,
            "{globals:?} changes nothing"
        );
    }
}

#[test]
fn a_misplaced_conflict_fails_like_clap_with_exit_code_2() {
    let o = meshctl(&[
        "--kubeconfig",
        "k",
        "plan",
        "--node",
        "fra-1",
        "--nodes",
        THREE_CLOUDS,
    ]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("cannot be used with"), "{err}");
    assert!(o.stdout.is_empty());
}

/// The subcommands every completion script must offer.
const SUBCOMMANDS: &[&str] = &[
    "plan",
    "status",
    "graph",
    "showconf",
    "peer",
    "doctor",
    "lab",
    "completion",
];

/// `shell -n FILE` (syntax check only) when `shell` is installed; false when it is not.
fn syntax_checked(shell: &str, script: &[u8]) -> bool {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("meshctl-completion");
    std::fs::write(&path, script).expect("write script");
    match Command::new(shell).arg("-n").arg(&path).output() {
        Ok(o) => {
            assert!(
                o.status.success(),
                "{shell} -n refuses the script: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            true
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => panic!("running {shell}: {e}"),
    }
}

#[test]
fn completion_scripts_parse_and_name_the_subcommands_and_global_flags() {
    for shell in ["bash", "zsh", "fish"] {
        let script = stdout(&["completion", shell]);
        let text = String::from_utf8(script.clone()).expect("utf-8");
        for sub in SUBCOMMANDS {
            assert!(text.contains(sub), "{shell}: no {sub}");
        }
        for flag in ["nodes", "kubeconfig", "output"] {
            assert!(text.contains(flag), "{shell}: no --{flag}");
        }
        let checked = syntax_checked(shell, &script);
        assert!(checked || shell != "bash", "bash is not installed");
    }
}

#[test]
fn bash_completion_completes_subcommands_and_flags_before_them() {
    let script = stdout(&["completion", "bash"]);
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("meshctl.bash");
    std::fs::write(&path, script).expect("write script");
    // Load the script, complete a command line as bash would, print the candidates.
    let complete = |line: &[&str]| -> Vec<String> {
        let words = line
            .iter()
            .map(|w| format!("'{w}'"))
            .collect::<Vec<_>>()
            .join(" ");
        let program = format!(
            "source '{}'\nCOMP_WORDS=({words})\nCOMP_CWORD={}\nCOMP_LINE=\"${{COMP_WORDS[*]}}\"\n\
             COMP_POINT=${{#COMP_LINE}}\n_meshctl meshctl '{}' '{}'\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n",
            path.display(),
            line.len() - 1,
            line[line.len() - 1],
            line[line.len().saturating_sub(2)],
        );
        let o = Command::new("bash")
            .args(["--norc", "--noprofile", "-c", &program])
            .output()
            .expect("run bash");
        assert!(
            o.status.success(),
            "{line:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    };
    let subs = complete(&["meshctl", "sh"]);
    assert_eq!(subs, ["showconf"]);
    let flags = complete(&["meshctl", "--no"]);
    assert_eq!(flags, ["--nodes"]);
    let after = complete(&["meshctl", "plan", "--tim"]);
    assert_eq!(after, ["--timings"]);
    let behind_globals = complete(&["meshctl", "--nodes", "f.yaml", "plan", "--tim"]);
    assert_eq!(behind_globals, ["--timings"]);
}
