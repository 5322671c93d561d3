//! A loaded rule set and the three decisions the gateway asks of it.
//!
//! The rules that apply to a client are: the anonymous section (username `None`) or the
//! client's own user section (one hash lookup, so cost does not depend on other users),
//! plus every `pattern`. Among those, a matching `deny` refuses whatever grants match;
//! otherwise a matching grant of the right kind allows; no match means deny. The deciding
//! line is the first matching deny, else the first matching grant, in file order.
//! Topics are matched level by level; subscriptions must be covered entirely by one rule.

use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::parse::{parse, Rules};
use crate::rule::{Grant, Rule, Subst};
use crate::topic::{strip_share, valid_topic_filter, valid_topic_name};
use crate::{Access, AclError, Decision, Identity};

/// An immutable, compiled ACL. Share it in an `Arc`; reloading builds a new one.
#[derive(Debug)]
pub struct Acl {
    file: Option<PathBuf>,
    builtin: bool,
    /// SHA-256 of the text the rules were parsed from (`None`: the built-in rules).
    digest: Option<[u8; 32]>,
    anonymous: Vec<Rule>,
    users: HashMap<Box<str>, Vec<Rule>>,
    patterns: Vec<Rule>,
}

impl Acl {
    /// Parses ACL text; `file_name` is only used in errors and [`Acl::file_name`].
    pub fn parse(file_name: &Path, text: &str) -> Result<Acl, AclError> {
        let Rules {
            anonymous,
            users,
            patterns,
        } = parse(file_name, text)?;
        Ok(Acl {
            file: Some(file_name.to_path_buf()),
            builtin: false,
            digest: Some(Sha256::digest(text.as_bytes()).into()),
            anonymous,
            users,
            patterns,
        })
    }

    /// Reads and parses an ACL file. Bytes that are not UTF-8 are a parse error.
    pub fn load(path: &Path) -> Result<Acl, AclError> {
        let bytes = std::fs::read(path).map_err(|source| AclError::Io {
            file: path.to_path_buf(),
            source,
        })?;
        match std::str::from_utf8(&bytes) {
            Ok(text) => Acl::parse(path, text),
            Err(e) => {
                let valid = bytes.get(..e.valid_up_to()).unwrap_or_default();
                Err(AclError::Parse {
                    file: path.to_path_buf(),
                    line: 1 + valid.iter().filter(|&&b| b == b'\n').count(),
                    reason: "not valid UTF-8".to_owned(),
                })
            }
        }
    }

    /// The rules used when no ACL file is configured: anonymous clients may read and
    /// write every topic except `$`-topics (`topic readwrite #` in the anonymous
    /// section); authenticated users get only `pattern readwrite %u/#` (tenant isolation).
    /// Decisions from these rules carry no line.
    pub fn builtin_default() -> Acl {
        Acl {
            file: None,
            builtin: true,
            digest: None,
            anonymous: vec![Rule::new(Grant::ReadWrite, 1, "#", false)],
            users: HashMap::new(),
            patterns: vec![Rule::new(Grant::ReadWrite, 2, "%u/#", true)],
        }
    }

    /// SHA-256 of the text these rules were parsed from; `None` for
    /// [`Acl::builtin_default`]. Two nodes of a cluster with the same digest enforce
    /// the same rules.
    pub fn digest(&self) -> Option<[u8; 32]> {
        self.digest
    }

    /// The file these rules came from; `None` for [`Acl::builtin_default`].
    pub fn file_name(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// Whether this is [`Acl::builtin_default`].
    pub fn is_builtin(&self) -> bool {
        self.builtin
    }

    /// Number of rules in the file (every `topic` and `pattern` line).
    pub fn rule_count(&self) -> usize {
        self.anonymous.len()
            + self.patterns.len()
            + self.users.values().map(Vec::len).sum::<usize>()
    }

    /// Write access to a topic name (PUBLISH, will message). An invalid topic name is denied.
    pub fn check_publish(&self, who: &Identity<'_>, topic: &str) -> Decision {
        self.check(who, Access::Write, topic)
    }

    /// Read access to a topic name, asked for every message delivered to a client.
    /// Does not allocate. An invalid topic name is denied.
    pub fn check_read(&self, who: &Identity<'_>, topic: &str) -> Decision {
        self.check(who, Access::Read, topic)
    }

    /// Read or write access to a topic name. Does not allocate.
    pub fn check(&self, who: &Identity<'_>, access: Access, topic: &str) -> Decision {
        if !valid_topic_name(topic) {
            return Decision::NO_MATCH;
        }
        self.decide(who, access, |rule, s| rule.matches(topic, s))
    }

    /// Whether a SUBSCRIBE filter is allowed: some read grant must cover it entirely
    /// (every topic it can match falls under that one rule), and no deny rule may cover it
    /// entirely. A deny rule covering only part of the filter does not refuse the
    /// subscription; [`Acl::check_read`] enforces it per message. `$share/<group>/` is
    /// stripped first; an invalid filter is denied.
    pub fn check_subscribe(&self, who: &Identity<'_>, filter: &str) -> Decision {
        let inner = match strip_share(filter) {
            Some(inner) if valid_topic_filter(filter) => inner,
            _ => return Decision::NO_MATCH,
        };
        self.decide(who, Access::Read, |rule, s| rule.covers(inner, s))
    }

    fn decide(
        &self,
        who: &Identity<'_>,
        access: Access,
        hit: impl Fn(&Rule, &Subst<'_>) -> bool,
    ) -> Decision {
        let subst = Subst::new(who.username, who.client_id);
        let own: &[Rule] = match who.username {
            None => &self.anonymous,
            Some(user) => self.users.get(user).map_or(&[], Vec::as_slice),
        };
        let mut deny: Option<usize> = None;
        let mut grant: Option<usize> = None;
        for rule in own.iter().chain(self.patterns.iter()) {
            let best = if rule.grant == Grant::Deny {
                &mut deny
            } else if rule.grant.grants(access) {
                &mut grant
            } else {
                continue;
            };
            if best.map_or(true, |line| rule.line < line) && hit(rule, &subst) {
                *best = Some(rule.line);
            }
        }
        let line = |l: usize| (!self.builtin).then_some(l);
        match (deny, grant) {
            (Some(d), _) => Decision {
                allowed: false,
                line: line(d),
            },
            (None, Some(g)) => Decision {
                allowed: true,
                line: line(g),
            },
            (None, None) => Decision::NO_MATCH,
        }
    }
}
