//! The guard destinations kept on disk across restarts and reboots: after a reboot the kernel
//! has none of wiremesh's routes while the CNI configuration is still there, so pods may start
//! before the registry is listed. The agent puts the guards of its last run back first thing
//! (blackholes at the lowest priority, see [`crate::desired::Route::guard`]), so those pods'
//! packets to other nodes are dropped, never sent unencrypted, until the mesh is programmed.
//!
//! Plain file I/O and text; depends on the reconciler's state types only. The file (`guards`,
//! next to the private key) holds one destination per line; it says nothing secret.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use ipnetwork::IpNetwork;

use crate::desired::{MAIN_TABLE, RouteDev};
use crate::reconcile::OwnedState;

/// The guards file of an agent whose private key is at `private_key`.
pub fn path_for(private_key: &Path) -> PathBuf {
    private_key.with_file_name("guards")
}

/// The destinations guarded in `state`, sorted.
pub fn of(state: &OwnedState) -> Vec<IpNetwork> {
    let mut v: Vec<IpNetwork> = state
        .routes
        .iter()
        .filter(|r| r.dev == RouteDev::Blackhole && r.table == MAIN_TABLE)
        .map(|r| r.dst)
        .collect();
    v.sort();
    v.dedup();
    v
}

/// A fingerprint of a destination list, to see whether it changed without keeping it.
pub fn fingerprint(dsts: &[IpNetwork]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    dsts.hash(&mut h);
    h.finish()
}

/// The file's text: a comment line, then one destination per line.
pub fn render(dsts: &[IpNetwork]) -> String {
    let mut s = String::from(
        "# wiremesh: destinations guarded by blackhole routes, restored at the agent's start\n",
    );
    for d in dsts {
        s.push_str(&d.to_string());
        s.push('\n');
    }
    s
}

/// The destinations in `text`; comments, blank and malformed lines are skipped (a damaged file
/// costs guards, never the start).
pub fn parse(text: &str) -> Vec<IpNetwork> {
    let mut v: Vec<IpNetwork> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.parse().ok())
        .filter(|n: &IpNetwork| n.ip() == n.network())
        .collect();
    v.sort();
    v.dedup();
    v
}

/// The destinations saved at `path` (none when there is no file).
pub fn load(path: &Path) -> std::io::Result<Vec<IpNetwork>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(parse(&text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// Save `dsts` at `path` in one rename (never half written).
pub fn save(path: &Path, dsts: &[IpNetwork]) -> std::io::Result<()> {
    crate::state_file::replace(path, &render(dsts))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::Route;

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    #[test]
    fn the_file_round_trips_and_damage_costs_only_the_damaged_lines() {
        let dsts = vec![
            net("10.42.1.0/24"),
            net("10.42.2.0/24"),
            net("fd00:42::/64"),
        ];
        assert_eq!(parse(&render(&dsts)), dsts);
        let damaged =
            "10.42.2.0/24\nnot a network\n10.42.1.5/24\n\n# c\n10.42.1.0/24\n10.42.1.0/24";
        assert_eq!(
            parse(damaged),
            vec![net("10.42.1.0/24"), net("10.42.2.0/24")]
        );
    }

    #[test]
    fn only_guards_of_the_main_table_are_kept_and_the_fingerprint_follows_them() {
        let mut state = OwnedState::default();
        let real = Route {
            dev: RouteDev::WireGuard,
            ..Route::blackhole(MAIN_TABLE, net("10.42.1.0/24"))
        };
        state.routes = vec![
            real.clone(),
            real.guard().unwrap(),
            Route::blackhole(1107, net("10.42.9.0/24")),
        ];
        assert_eq!(of(&state), vec![net("10.42.1.0/24")]);
        assert_eq!(
            fingerprint(&of(&state)),
            fingerprint(&[net("10.42.1.0/24")])
        );
        assert_ne!(fingerprint(&of(&state)), fingerprint(&[]));
    }

    #[test]
    fn saved_destinations_load_back_and_a_missing_file_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = path_for(&dir.path().join("key"));
        assert_eq!(load(&path).unwrap(), Vec::<IpNetwork>::new());
        let dsts = vec![net("10.42.1.0/24")];
        save(&path, &dsts).unwrap();
        assert_eq!(load(&path).unwrap(), dsts);
        assert!(!path.with_extension("tmp").exists());
    }
}
