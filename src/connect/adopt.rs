//! Whether `meshctl connect` may use the Peer of its name: create it, adopt it as it is, update
//! it, or leave it alone because someone else made it.
//!
//! Pure: no I/O. Depends on the Peer resource and its parser (two Peers are the same when the
//! agent reads them the same).

use std::collections::BTreeMap;

use crate::registry::peer::{PeerResource, parse_peer};

/// The annotation `meshctl connect` puts on the Peers it makes: the host name of the machine
/// that made it. A Peer without it was made by someone else.
pub const CONNECT_HOST: &str = "wiremesh.io/connect-host";

/// What to do with the Peer of the wanted name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Adoption {
    /// There is none: create it.
    Create,
    /// It exists as wanted: use it without writing. `ours` when this machine's `connect` made
    /// it (then it is removed on exit like one just created).
    Adopt {
        /// Whether it carries this host's [`CONNECT_HOST`] mark.
        ours: bool,
    },
    /// This host's `connect` made it, with other values (another key after the key file was
    /// lost, other allowed IPs): replace its spec.
    Update,
    /// It is someone else's: leave it alone. The text says whose and what to do, in one line.
    Refuse(String),
}

/// The decision for `existing` (the stored Peer of `want`'s name, if any), given `want` (the
/// Peer this machine needs, with this machine's public key) and `host` (this machine's name,
/// the value of [`CONNECT_HOST`]).
///
/// A Peer marked by this host is this machine's: adopted, or updated when it differs. A Peer
/// marked by another host is refused (two machines would fight over one Peer). An unmarked
/// Peer is adopted only when it already holds exactly what is wanted (this machine's key and
/// allowed IPs: made by hand, e.g. `meshctl peer add`); it is never changed nor deleted.
pub fn decide(existing: Option<&PeerResource>, want: &PeerResource, host: &str) -> Adoption {
    let Some(have) = existing else {
        return Adoption::Create;
    };
    let name = want.metadata.name.as_deref().unwrap_or_default();
    let same = match (parse_peer(have), parse_peer(want)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    match mark(have) {
        Some(h) if h == host => {
            if same {
                Adoption::Adopt { ours: true }
            } else {
                Adoption::Update
            }
        }
        Some(other) => Adoption::Refuse(format!(
            "peer {name} is connected from host {other:?} ({CONNECT_HOST}); it is left alone: \
             use another name, or delete it (`meshctl peer delete {name}`) once that machine \
             is gone"
        )),
        None if same => Adoption::Adopt { ours: false },
        None if have.spec.public_key.trim() == want.spec.public_key => Adoption::Refuse(format!(
            "peer {name} has this machine's key but was not made by meshctl connect, and its \
             values differ (allowed IPs {}, wanted {}); it is left alone: connect with its \
             values, or delete it (`meshctl peer delete {name}`)",
            have.spec.allowed_ips.join(","),
            want.spec.allowed_ips.join(",")
        )),
        None => Adoption::Refuse(format!(
            "peer {name} exists and is not this machine's (its key is {}, this machine's is \
             {}); it was not made by meshctl connect, so it is left alone: use another name, or \
             delete it (`meshctl peer delete {name}`)",
            have.spec.public_key, want.spec.public_key
        )),
    }
}

/// The host that made `peer` with `meshctl connect`, if it carries the mark.
pub fn mark(peer: &PeerResource) -> Option<&str> {
    peer.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(CONNECT_HOST))
        .map(String::as_str)
}

/// `peer` with this host's mark.
pub fn marked(mut peer: PeerResource, host: &str) -> PeerResource {
    peer.metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(CONNECT_HOST.to_owned(), host.to_owned());
    peer
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::peer::{NewPeer, build};

    const MINE: &str = "uN6GxGhVSEBwdGc3biyYBmAKCFyywS0JuWcOHUm9RHk=";
    const THEIRS: &str = "GFq2ybvXDH4BtAkl+fuAkW+BXmYhN6V8gl5nE4bkJXo=";

    fn peer(key: &str, ips: &[&str]) -> PeerResource {
        build(&NewPeer {
            name: "laptop".into(),
            public_key: key.into(),
            allowed_ips: ips.iter().map(|s| s.to_string()).collect(),
            persistent_keepalive: 10,
            ..NewPeer::default()
        })
        .expect("valid peer")
    }

    fn want() -> PeerResource {
        marked(peer(MINE, &["10.5.0.1/32"]), "here")
    }

    #[test]
    fn no_peer_is_created() {
        assert_eq!(decide(None, &want(), "here"), Adoption::Create);
    }

    #[test]
    fn a_peer_this_host_made_is_adopted_as_ours_and_updated_when_it_differs() {
        assert_eq!(
            decide(Some(&want()), &want(), "here"),
            Adoption::Adopt { ours: true }
        );
        let other_key = marked(peer(THEIRS, &["10.5.0.1/32"]), "here");
        assert_eq!(decide(Some(&other_key), &want(), "here"), Adoption::Update);
        let other_ips = marked(peer(MINE, &["10.5.0.2/32"]), "here");
        assert_eq!(decide(Some(&other_ips), &want(), "here"), Adoption::Update);
    }

    #[test]
    fn a_peer_another_host_connected_is_refused_naming_that_host() {
        let theirs = marked(peer(THEIRS, &["10.5.0.1/32"]), "elsewhere");
        let Adoption::Refuse(why) = decide(Some(&theirs), &want(), "here") else {
            panic!("must refuse");
        };
        assert!(
            why.contains("peer laptop is connected from host \"elsewhere\""),
            "{why}"
        );
        assert!(!why.contains('\n'), "{why}");
        // Even with this machine's key: two hosts must not share one Peer.
        let same_key = marked(peer(MINE, &["10.5.0.1/32"]), "elsewhere");
        assert!(matches!(
            decide(Some(&same_key), &want(), "here"),
            Adoption::Refuse(_)
        ));
    }

    #[test]
    fn an_unmarked_peer_with_this_machines_key_and_values_is_adopted_but_not_ours() {
        // Made by hand (`meshctl peer add`) for this machine's key: used, never deleted.
        let by_hand = peer(MINE, &["10.5.0.1"]);
        assert_eq!(
            decide(Some(&by_hand), &want(), "here"),
            Adoption::Adopt { ours: false }
        );
    }

    #[test]
    fn an_unmarked_peer_that_differs_is_never_overwritten() {
        let other_ips = peer(MINE, &["10.5.0.9/32"]);
        let Adoption::Refuse(why) = decide(Some(&other_ips), &want(), "here") else {
            panic!("must refuse");
        };
        assert!(why.contains("has this machine's key but was not made by meshctl connect"));
        assert!(
            why.contains("10.5.0.9/32") && why.contains("10.5.0.1/32"),
            "{why}"
        );
        let someone_else = peer(THEIRS, &["10.5.0.1/32"]);
        let Adoption::Refuse(why) = decide(Some(&someone_else), &want(), "here") else {
            panic!("must refuse");
        };
        assert!(why.contains("exists and is not this machine's"), "{why}");
        assert!(why.contains(THEIRS) && why.contains(MINE), "{why}");
        assert!(why.contains("meshctl peer delete laptop"), "{why}");
    }
}
