//! Topic access control for moatmq: Mosquitto-syntax ACL files, MQTT topic/filter
//! matching and access decisions.
//!
//! How it decides (see [`Acl`]):
//! - The rules that apply to a client are its section of the file (the anonymous section
//!   before the first `user` line for clients without a username, otherwise its own
//!   `user` section) plus every `pattern` line, wherever it appears.
//! - Default deny: no matching rule means no access. A matching `deny` rule wins over any
//!   grant. [`Decision::line`] names the deciding rule: the first matching deny, else the
//!   first matching grant.
//! - A leading `#` or `+`, in a rule or a subscription filter, never matches a `$`-topic.
//! - `%u` / `%c` in patterns never match for anonymous clients (`%u`) or for a username
//!   or client id that is empty, starts with `$`, or contains `/`, `+`, `#`, NUL or a
//!   control character (the CVE-2017-7650 class).
//! - A subscription is granted only if one read grant covers the whole filter and no deny
//!   rule covers the whole filter; partial denies are enforced per delivered message by
//!   [`Acl::check_read`], which never allocates.
//!
//! No async, no I/O beyond [`Acl::load`], no broker types: the gateway calls in.

#![forbid(unsafe_code)]

mod acl;
mod error;
mod parse;
mod rule;
mod topic;

#[cfg(test)]
mod tests;

pub use acl::Acl;
pub use error::AclError;
pub use topic::{
    strip_share, topic_matches_filter, valid_topic_filter, valid_topic_name, MAX_TOPIC_LEN,
};

/// Who is asking: the authenticated username (`None` for anonymous clients) and the
/// MQTT client id, as used for `user` sections and `%u` / `%c` substitution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity<'a> {
    /// The authenticated username, or `None` for an anonymous client.
    pub username: Option<&'a str>,
    /// The client id of the connection.
    pub client_id: &'a str,
}

/// The kind of access a rule grants and a check asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Receive messages on a topic (deliveries, subscriptions).
    Read,
    /// Publish to a topic (PUBLISH, will messages).
    Write,
}

/// The outcome of a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Whether access is allowed.
    pub allowed: bool,
    /// 1-based line of the deciding rule in the ACL file; `None` when no rule matched
    /// (default deny) or the rule is built in.
    pub line: Option<usize>,
}

impl Decision {
    /// Default deny: no rule matched.
    pub const NO_MATCH: Decision = Decision {
        allowed: false,
        line: None,
    };
}
