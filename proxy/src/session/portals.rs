//! The portals of an extended-protocol request: which Bind each message
//! that names a portal refers to, and how the proxy handles each portal.

use super::extended::Item;

/// The portals a request binds, in order (usually one: a map would cost
/// more than it saves).
#[derive(Default)]
pub(super) struct Portals(Vec<(String, PortalUse)>);

impl Portals {
    /// A cursor to walk the request's items with, in order.
    pub(super) fn cursor(&self) -> PortalCursor<'_> {
        PortalCursor {
            portals: self,
            binds_seen: 0,
        }
    }

    pub(super) fn insert(&mut self, name: String, usage: PortalUse) {
        self.0.push((name, usage));
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &PortalUse> {
        self.0.iter().map(|(_, u)| u)
    }
}

/// Resolves each item's portal to the Bind before it that bound that name:
/// a name may be bound twice in one request (pgjdbc binds its BEGIN and the
/// statement after it both to the unnamed portal), so a lookup by name alone
/// would give the BEGIN's Execute the statement's use.
pub(super) struct PortalCursor<'a> {
    portals: &'a Portals,
    binds_seen: usize,
}

impl<'a> PortalCursor<'a> {
    /// The use of the portal `item` binds, describes, executes or closes
    /// (None for other items, and for a portal this request did not bind).
    /// Call it for every item, in order.
    pub(super) fn step(&mut self, item: &Item) -> Option<&'a PortalUse> {
        let name = match item {
            Item::Bind(_, bind, _) => {
                self.binds_seen += 1;
                &bind.portal
            }
            Item::Execute(_, portal) => portal,
            Item::Describe(_, target, _) | Item::Close(_, target) if target.kind == b'P' => {
                &target.name
            }
            _ => return None,
        };
        let bound = &self.portals.0[..self.binds_seen.min(self.portals.0.len())];
        bound.iter().rev().find(|(n, _)| n == name).map(|(_, u)| u)
    }
}

/// How the proxy handles a bound portal.
#[derive(Clone)]
pub(super) enum PortalUse {
    Forward,
    /// Transaction control answered by the proxy: CommandComplete tag.
    Answer(&'static str),
    /// COMMIT (true) or ROLLBACK of a transaction that spans servers: the
    /// proxy ends it on every server (see `legs`).
    EndLegs(bool),
}
