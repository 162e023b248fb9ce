//! Flags that may come before the subcommand as well as after it (`meshctl --nodes FILE plan
//! --node a` = `meshctl plan --node a --nodes FILE`), as kubectl's and kgctl's global flags.
//!
//! clap's own `global = true` cannot express this here: a global argument reaches every
//! subcommand and has one definition, while `meshctl`'s `--nodes` is a file in `plan` and a
//! count in `lab up`, and `-o` takes `text|json` in `plan` but `wireguard|json|yaml` in
//! `showconf`. So each subcommand keeps its own definition (values, defaults, conflicts), and
//! [`hoist`] moves the named flags, before clap parses, from in front of the subcommand to right
//! after the subcommand path. A subcommand without the flag then rejects it with clap's usual
//! error. [`with_leading`] declares the same flags on the top-level command, so that `--help`
//! and shell completions show them there; [`parse`] does both and says where a subcommand's own
//! flag belongs when it was put first.
//!
//! Pure: works on the `clap::Command` definition and the argument list; no I/O.

use std::ffi::OsString;

use clap::error::ErrorKind;
use clap::{Arg, ArgAction, Command, FromArgMatches};

/// Parse `args` (program name first) as `cmd` (made by [`with_leading`] with `longs`) into `P`,
/// with the flags of `longs` before or after the subcommand. A flag of the subcommand's own put
/// before it is refused with a message that says so (clap would suggest a top-level flag of a
/// similar name, such as `--nodes` for `--node`).
pub fn parse<P, I, T>(mut cmd: Command, longs: &[&str], args: I) -> Result<P, clap::Error>
where
    P: FromArgMatches,
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    let args = hoist(&cmd, longs, args);
    let matches = match cmd.try_get_matches_from_mut(args.iter().cloned()) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::UnknownArgument => {
            return Err(match misplaced(&cmd, &args) {
                Some((flag, sub)) => cmd.error(
                    ErrorKind::UnknownArgument,
                    format!("{flag} is an option of `{sub}`: put it after `{sub}`"),
                ),
                None => e,
            });
        }
        Err(e) => return Err(e),
    };
    P::from_arg_matches(&matches).map_err(|e| e.format(&mut cmd))
}

/// The first flag before the subcommand that the top level does not know but the subcommand
/// (or one below it) does, with the subcommand's name.
fn misplaced(cmd: &Command, args: &[OsString]) -> Option<(String, String)> {
    let mut cmd = cmd.clone();
    cmd.build();
    let tokens: Vec<&str> = args.iter().skip(1).map_while(|a| a.to_str()).collect();
    let (at, sub) = tokens.iter().enumerate().find_map(|(i, t)| {
        cmd.find_subcommand(t)
            .filter(|s| s.get_name() != "help")
            .map(|s| (i, s))
    })?;
    tokens[..at].iter().find_map(|t| {
        let (f, _) = flag(t)?;
        let known = |c: &Command| find(c, &f).is_some();
        if known(&cmd) || !defined_below(sub, &known) {
            return None;
        }
        let name = t.split_once('=').map_or(*t, |(n, _)| n);
        Some((name.to_owned(), sub.get_name().to_owned()))
    })
}

/// Whether `cmd` or one of its subcommands satisfies `known`.
fn defined_below(cmd: &Command, known: &dyn Fn(&Command) -> bool) -> bool {
    known(cmd) || cmd.get_subcommands().any(|s| defined_below(s, known))
}

/// `cmd` with a top-level copy of each flag in `longs` (long names, as `nodes` for `--nodes`),
/// taken from the first subcommand (depth first) that defines it, under `heading`. The copies
/// keep name, short name, value name, help and value parser; they carry no default, no
/// environment variable and no relation to other flags, and never hold a value once [`hoist`]
/// has run (clap only fills them when no subcommand follows, and then refuses the command line).
/// A name no subcommand defines is left out.
pub fn with_leading(mut cmd: Command, longs: &[&'static str], heading: &'static str) -> Command {
    for &long in longs {
        let Some(src) = find_in_subcommands(&cmd, long) else {
            continue;
        };
        let mut arg = Arg::new(src.get_id().clone())
            .long(long)
            .help_heading(heading)
            .value_parser(src.get_value_parser().clone())
            .action(match src.get_action() {
                ArgAction::Append => ArgAction::Append,
                _ => ArgAction::Set,
            });
        if let Some(s) = src.get_short() {
            arg = arg.short(s);
        }
        if let Some(names) = src.get_value_names() {
            arg = arg.value_names(names.iter().cloned());
        }
        if let Some(help) = src.get_help() {
            arg = arg.help(help.clone());
        }
        cmd = cmd.arg(arg);
    }
    cmd
}

/// The first definition of `--long` in `cmd`'s subcommands, depth first.
fn find_in_subcommands(cmd: &Command, long: &str) -> Option<Arg> {
    cmd.get_subcommands().find_map(|sc| {
        sc.get_arguments()
            .find(|a| a.get_long() == Some(long))
            .cloned()
            .or_else(|| find_in_subcommands(sc, long))
    })
}

/// A command-line token that names a flag.
enum Flag<'a> {
    Long(&'a str),
    Short(char),
}

/// The flag `token` names, and whether it carries its value (`--x=v`, `-xv`); `None` for a
/// value, `-` or `--`.
fn flag(token: &str) -> Option<(Flag<'_>, bool)> {
    if token == "--" {
        return None;
    }
    if let Some(rest) = token.strip_prefix("--") {
        return Some(match rest.split_once('=') {
            Some((name, _)) => (Flag::Long(name), true),
            None => (Flag::Long(rest), false),
        });
    }
    let mut chars = token.strip_prefix('-')?.chars();
    let c = chars.next()?;
    Some((Flag::Short(c), chars.next().is_some()))
}

/// The argument `f` names in `cmd` (built: global arguments of parents included).
fn find<'c>(cmd: &'c Command, f: &Flag<'_>) -> Option<&'c Arg> {
    cmd.get_arguments().find(|a| match f {
        Flag::Long(l) => {
            a.get_long() == Some(*l) || a.get_all_aliases().is_some_and(|al| al.contains(l))
        }
        Flag::Short(s) => a.get_short() == Some(*s),
    })
}

/// How many tokens the flag `token` takes in `cmd` (1 or 2); `None` when `cmd` has no such flag.
fn span(cmd: &Command, token: &str) -> Option<usize> {
    let (f, inline) = flag(token)?;
    let arg = find(cmd, &f)?;
    Some(if arg.get_action().takes_values() && !inline {
        2
    } else {
        1
    })
}

/// `args` (program name first) with every flag of `longs` that stands before the subcommand,
/// with its value, moved to right after the subcommand path (`meshctl --nodes F showconf node
/// a` → `meshctl showconf --nodes F node a`; `meshctl -o json lab status` → `meshctl lab
/// status -o json`). The other top-level flags stay where they are; the flags keep their order.
/// Left as it is when no such flag comes first, when there is no subcommand, when an unknown
/// flag comes before it (clap reports it), and for `help`.
pub fn hoist<I, T>(cmd: &Command, longs: &[&str], args: I) -> Vec<OsString>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let mut cmd = cmd.clone();
    cmd.build();
    let is_leading = |a: &Arg| a.get_long().is_some_and(|l| longs.contains(&l));

    // The tokens before the subcommand: leading flags (to move) and other top-level flags.
    let mut moved: Vec<usize> = Vec::new();
    let mut i = 1;
    let sub = loop {
        let Some(token) = args.get(i).and_then(|t| t.to_str()) else {
            return args;
        };
        let Some((f, _)) = flag(token) else {
            break cmd.find_subcommand(token);
        };
        let (Some(arg), Some(n)) = (find(&cmd, &f), span(&cmd, token)) else {
            return args;
        };
        if is_leading(arg) {
            moved.extend(i..(i + n).min(args.len()));
        }
        i += n;
    };
    let Some(mut sub) = sub else {
        return args;
    };
    if moved.is_empty() || sub.get_name() == "help" {
        return args;
    }

    // Down the subcommand path: its flags, then a nested subcommand's name, and so on.
    let mut at = i + 1;
    let mut j = at;
    while sub.has_subcommands() {
        let Some(token) = args.get(j).and_then(|t| t.to_str()) else {
            break;
        };
        if flag(token).is_some() {
            match span(sub, token) {
                Some(n) => j += n,
                None => break,
            }
            continue;
        }
        match sub.find_subcommand(token) {
            Some(next) if next.get_name() != "help" => {
                sub = next;
                j += 1;
                at = j;
            }
            _ => break,
        }
    }

    let mut out = Vec::with_capacity(args.len());
    out.push(args[0].clone());
    out.extend(
        (1..at)
            .filter(|k| !moved.contains(k))
            .map(|k| args[k].clone()),
    );
    out.extend(moved.iter().map(|&k| args[k].clone()));
    out.extend(args[at..].iter().cloned());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small tree: `--file` is a file in `show` and a count in `gen`, `-o` differs, `nest`
    /// has subcommands, `--verbose` is a real top-level flag.
    fn cmd() -> Command {
        let base = Command::new("t")
            .arg(
                Arg::new("verbose")
                    .long("verbose")
                    .action(ArgAction::SetTrue)
                    .global(true),
            )
            .subcommand(
                Command::new("show")
                    .arg(Arg::new("file").long("file").help("The file."))
                    .arg(
                        Arg::new("output")
                            .short('o')
                            .long("output")
                            .value_parser(["text", "json"]),
                    )
                    .arg(Arg::new("all").long("all").action(ArgAction::SetTrue))
                    .arg(Arg::new("name")),
            )
            .subcommand(
                Command::new("gen").arg(
                    Arg::new("file")
                        .long("file")
                        .value_parser(clap::value_parser!(u32)),
                ),
            )
            .subcommand(
                Command::new("nest")
                    .arg(Arg::new("ctx").long("ctx").global(true))
                    .subcommand(
                        Command::new("inner").arg(
                            Arg::new("output")
                                .short('o')
                                .long("output")
                                .value_parser(["wire", "yaml"]),
                        ),
                    ),
            );
        with_leading(base, &["file", "output", "ctx", "absent"], "Global")
    }

    fn run(args: &str) -> String {
        let out = hoist(&cmd(), &["file", "output", "ctx"], args.split(' '));
        out.iter()
            .map(|a| a.to_str().expect("utf-8"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn leading_flags_move_after_the_subcommand_in_their_order() {
        assert_eq!(run("t --file f show a"), "t show --file f a");
        assert_eq!(
            run("t --file=f -o json show a"),
            "t show --file=f -o json a"
        );
        assert_eq!(run("t -ojson --file f show"), "t show -ojson --file f");
        // A value that looks like the subcommand is still the flag's value.
        assert_eq!(run("t --file show show a"), "t show --file show a");
    }

    #[test]
    fn other_top_level_flags_stay_in_front() {
        assert_eq!(
            run("t --verbose --file f show --all"),
            "t --verbose show --file f --all"
        );
    }

    #[test]
    fn nested_subcommands_get_the_flags_after_their_whole_path() {
        assert_eq!(run("t -o yaml nest inner"), "t nest inner -o yaml");
        assert_eq!(
            run("t --ctx c -o yaml nest --ctx d inner"),
            "t nest --ctx d inner --ctx c -o yaml"
        );
    }

    #[test]
    fn nothing_moves_without_a_subcommand_or_behind_an_unknown_flag() {
        for unchanged in [
            "t --file f",
            "t --file f --bogus show",
            "t --file f nosuch",
            "t --file f help show",
            "t show --file f",
        ] {
            assert_eq!(run(unchanged), unchanged);
        }
    }

    #[test]
    fn each_subcommand_parses_the_moved_flag_with_its_own_definition() {
        let mut c = cmd();
        let m = c
            .try_get_matches_from_mut(hoist(&c, &["file"], ["t", "--file", "7", "gen"]))
            .expect("parses");
        let (_, sub) = m.subcommand().expect("subcommand");
        assert_eq!(sub.get_one::<u32>("file"), Some(&7));
        let e = c
            .try_get_matches_from_mut(hoist(&c, &["output"], ["t", "-o", "yaml", "show"]))
            .expect_err("show takes text or json");
        assert_eq!(e.kind(), clap::error::ErrorKind::InvalidValue);
        let e = c
            .try_get_matches_from_mut(hoist(&c, &["output"], ["t", "-o", "json", "gen"]))
            .expect_err("gen has no -o");
        assert_eq!(e.kind(), clap::error::ErrorKind::UnknownArgument);
    }

    #[derive(Debug)]
    struct Seen(Option<u32>);

    impl FromArgMatches for Seen {
        fn from_arg_matches(m: &clap::ArgMatches) -> Result<Self, clap::Error> {
            Ok(Seen(m.subcommand().and_then(|(_, s)| {
                s.try_get_one::<u32>("file").ok().flatten().copied()
            })))
        }
        fn update_from_arg_matches(&mut self, m: &clap::ArgMatches) -> Result<(), clap::Error> {
            *self = Self::from_arg_matches(m)?;
            Ok(())
        }
    }

    #[test]
    fn parse_moves_the_flags_and_names_the_place_of_a_subcommands_own_flag() {
        let seen: Seen = parse(cmd(), &["file"], ["t", "--file", "3", "gen"]).expect("parses");
        assert_eq!(seen.0, Some(3));
        for (args, flag) in [
            (&["t", "--all", "show"][..], "--all"),
            (&["t", "--file", "f", "--all=x", "show", "a"], "--all"),
        ] {
            let e = parse::<Seen, _, _>(cmd(), &["file"], args).expect_err("refused");
            assert_eq!(e.kind(), ErrorKind::UnknownArgument);
            let text = e.to_string();
            assert!(
                text.contains(&format!(
                    "{flag} is an option of `show`: put it after `show`"
                )),
                "{text}"
            );
        }
        // A flag no subcommand knows keeps clap's own message.
        let e =
            parse::<Seen, _, _>(cmd(), &["file"], ["t", "--bogus", "show"]).expect_err("refused");
        assert!(!e.to_string().contains("is an option of"), "{e}");
    }

    #[test]
    fn top_level_copies_keep_help_and_short_name_but_no_relations() {
        let c = cmd();
        c.clone().debug_assert();
        let o = c
            .get_arguments()
            .find(|a| a.get_id() == "output")
            .expect("copied");
        assert_eq!(o.get_short(), Some('o'));
        assert_eq!(o.get_help_heading(), Some("Global"));
        let f = c
            .get_arguments()
            .find(|a| a.get_id() == "file")
            .expect("copied");
        assert_eq!(
            f.get_help().map(ToString::to_string).as_deref(),
            Some("The file.")
        );
        assert!(!c.get_arguments().any(|a| a.get_id() == "absent"));
    }
}
