//! The checks the gateway asks for: who a client is (authentication) and what it may do
//! (authorization). The gateway calls these and nothing else decides access.

use std::sync::Arc;

/// Who a connected client is.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Authenticated username or certificate CN; `None` for anonymous clients.
    pub username: Option<String>,
    /// The client id the client connected with (or was assigned).
    pub client_id: String,
}

/// Why a CONNECT was refused by authentication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// Wrong or unknown username/password (3.1.1: 0x04, 5: 0x86).
    BadCredentials,
    /// Anonymous refused, or the identity is not acceptable (3.1.1: 0x05, 5: 0x87).
    NotAuthorized,
}

/// What a listener accepts.
#[derive(Debug, Clone)]
pub struct ListenerPolicy {
    pub name: Arc<str>,
    pub allow_anonymous: bool,
}

/// Authentication and authorization decisions.
#[derive(Default)]
pub struct Policy {}

impl Policy {
    /// Decides who a CONNECT is. `cert_identity` is the verified certificate CN when the
    /// listener maps certificates to identities.
    pub async fn authenticate(
        &self,
        listener: &ListenerPolicy,
        username: Option<&str>,
        _password: Option<&str>,
        cert_identity: Option<&str>,
    ) -> Result<Option<String>, AuthFailure> {
        if let Some(cn) = cert_identity {
            if username.is_some_and(|u| u != cn) {
                return Err(AuthFailure::NotAuthorized);
            }
            return Ok(Some(cn.to_string()));
        }
        match username {
            Some(_) => Err(AuthFailure::BadCredentials),
            None if listener.allow_anonymous => Ok(None),
            None => Err(AuthFailure::NotAuthorized),
        }
    }

    /// May `who` publish to `topic`?
    pub fn may_publish(&self, _who: &Identity, topic: &str) -> bool {
        !topic.starts_with('$')
    }

    /// May `who` subscribe to `filter` (a `$share/group/` prefix already removed)?
    pub fn may_subscribe(&self, _who: &Identity, filter: &str) -> bool {
        !filter.starts_with('$')
    }

    /// May `who` receive a message on `topic`? Checked for every delivered message.
    pub fn may_read(&self, _who: &Identity, _topic: &str) -> bool {
        true
    }
}

/// Strips a `$share/<group>/` prefix.
pub fn unshare(filter: &str) -> &str {
    filter
        .strip_prefix("$share/")
        .and_then(|rest| rest.split_once('/'))
        .map_or(filter, |(_, f)| f)
}
