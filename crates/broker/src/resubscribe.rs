//! A session's subscriptions made again in rumqttd's router: at start-up for stored
//! sessions (`session_restore.rs`) and when a persistent session resumes with
//! subscription identifiers, which rumqttd forgets when its client goes (`gateway`).

use crate::cluster::Groups;
use crate::retained_index::qos_from;
use crate::router::{router_filter, GroupFilters};
use crate::sessions::Filters;
use crate::topic::is_sys;
use moatmq_store::SubscriptionOptions;
use rumqttd::protocol::{Filter, Packet, RetainForwardRule, Subscribe, SubscribeProperties};

/// SUBSCRIBEs that make `subscriptions` (those `which` picks) again in the router under
/// their owner's namespace: one per subscription identifier, since the router keeps a
/// packet's one identifier for each of its filters. `$SYS/...` filters are the
/// gateway's own (`sys.rs`): the router refuses them. With the cluster's `groups`,
/// shared subscriptions are made as group members, with the groups' mark for identifier
/// (`cluster/groups.rs`).
pub fn router_subscribes(
    groups: Option<&Groups>,
    owner: Option<&str>,
    subscriptions: &Filters,
    which: impl Fn(&str, &SubscriptionOptions) -> bool,
) -> Vec<Packet> {
    let mut by_id: std::collections::BTreeMap<Option<usize>, Vec<Filter>> = Default::default();
    for (f, o) in subscriptions.iter() {
        if is_sys(f) || !which(f, o) {
            continue;
        }
        let id = match groups {
            Some(_) if f.starts_with("$share/") => Some(crate::cluster::groups::MARK),
            _ => o.subscription_id.map(|id| id as usize),
        };
        by_id.entry(id).or_default().push(Filter {
            path: router_filter(groups.map(|g| g as &dyn GroupFilters), owner, f),
            qos: qos_from(o.qos),
            nolocal: o.no_local,
            preserve_retain: o.retain_as_published,
            retain_forward_rule: RetainForwardRule::Never,
        });
    }
    by_id
        .into_iter()
        .map(|(id, filters)| {
            let props = id.map(|id| SubscribeProperties {
                id: Some(id),
                user_properties: Vec::new(),
            });
            Packet::Subscribe(Subscribe { pkid: 1, filters }, props)
        })
        .collect()
}
