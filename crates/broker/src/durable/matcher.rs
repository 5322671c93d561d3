//! Which offline persistent sessions a topic reaches: their subscriptions in a tree of
//! filter levels, so admitting a message costs the depth of its topic, not the number
//! of offline sessions. Matching follows MQTT 4.7: `+` is one level, `#` the rest
//! including the parent level, and a wildcard in the first level does not match a topic
//! starting with `$`.

use std::collections::HashMap;

/// Subscriptions by filter, each with a value (whose it is, at what QoS).
pub(crate) struct Matcher<V> {
    root: Node<V>,
    len: usize,
}

struct Node<V> {
    levels: HashMap<Box<str>, Node<V>>,
    plus: Option<Box<Node<V>>>,
    /// Subscriptions ending in `#` at this node.
    rest: Vec<V>,
    /// Subscriptions ending exactly here.
    here: Vec<V>,
}

impl<V> Default for Node<V> {
    fn default() -> Self {
        Node {
            levels: HashMap::new(),
            plus: None,
            rest: Vec::new(),
            here: Vec::new(),
        }
    }
}

impl<V> Default for Matcher<V> {
    fn default() -> Self {
        Matcher {
            root: Node::default(),
            len: 0,
        }
    }
}

impl<V> Node<V> {
    fn is_empty(&self) -> bool {
        self.levels.is_empty()
            && self.plus.is_none()
            && self.rest.is_empty()
            && self.here.is_empty()
    }
}

impl<V> Matcher<V> {
    /// Adds `value` under `filter` (a valid, non-shared MQTT filter).
    pub(crate) fn insert(&mut self, filter: &str, value: V) {
        let mut node = &mut self.root;
        for level in filter.split('/') {
            node = match level {
                "#" => {
                    node.rest.push(value);
                    self.len += 1;
                    return;
                }
                "+" => node.plus.get_or_insert_with(Box::default),
                l => node.levels.entry(l.into()).or_default(),
            };
        }
        node.here.push(value);
        self.len += 1;
    }

    /// Removes the subscriptions under `filter` whose value `is`; empty branches go.
    pub(crate) fn remove(&mut self, filter: &str, is: impl Fn(&V) -> bool) {
        let levels: Vec<&str> = filter.split('/').collect();
        self.len -= remove_at(&mut self.root, &levels, &is);
    }

    /// Calls `found` with the value of every subscription matching `topic`.
    pub(crate) fn for_each_match<'a>(&'a self, topic: &str, mut found: impl FnMut(&'a V)) {
        let dollar = topic.starts_with('$');
        walk(&self.root, topic.split('/'), !dollar, &mut found);
    }

    /// How many subscriptions it holds.
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

fn remove_at<V>(node: &mut Node<V>, levels: &[&str], is: &impl Fn(&V) -> bool) -> usize {
    let take = |values: &mut Vec<V>| {
        let before = values.len();
        values.retain(|v| !is(v));
        before - values.len()
    };
    let Some((first, rest)) = levels.split_first() else {
        return take(&mut node.here);
    };
    match *first {
        "#" => take(&mut node.rest),
        "+" => {
            let Some(child) = node.plus.as_deref_mut() else {
                return 0;
            };
            let n = remove_at(child, rest, is);
            if child.is_empty() {
                node.plus = None;
            }
            n
        }
        l => {
            let Some(child) = node.levels.get_mut(l) else {
                return 0;
            };
            let n = remove_at(child, rest, is);
            if child.is_empty() {
                node.levels.remove(l);
            }
            n
        }
    }
}

/// `levels` is the rest of the topic (an iterator, so matching allocates nothing).
fn walk<'a, V>(
    node: &'a Node<V>,
    mut levels: std::str::Split<'_, char>,
    wildcards: bool,
    found: &mut impl FnMut(&'a V),
) {
    if wildcards {
        node.rest.iter().for_each(&mut *found);
    }
    let Some(first) = levels.next() else {
        node.here.iter().for_each(found);
        return;
    };
    if let Some(child) = node.levels.get(first) {
        walk(child, levels.clone(), true, found);
    }
    if let (true, Some(child)) = (wildcards, node.plus.as_deref()) {
        walk(child, levels, true, found);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(m: &Matcher<&'static str>, topic: &str) -> Vec<&'static str> {
        let mut out = Vec::new();
        m.for_each_match(topic, |v| out.push(*v));
        out.sort();
        out
    }

    #[test]
    fn levels_plus_and_hash_match_as_mqtt_says() {
        let mut m = Matcher::default();
        for (f, v) in [
            ("a/b", "exact"),
            ("a/+", "plus"),
            ("a/#", "hash"),
            ("#", "all"),
            ("+/+/c", "two"),
            ("$SYS/#", "sys"),
        ] {
            m.insert(f, v);
        }
        assert_eq!(matches(&m, "a/b"), ["all", "exact", "hash", "plus"]);
        assert_eq!(
            matches(&m, "a"),
            ["all", "hash"],
            "# takes the parent level"
        );
        assert_eq!(matches(&m, "a/b/c"), ["all", "hash", "two"]);
        assert_eq!(matches(&m, "x/y/c"), ["all", "two"]);
        assert_eq!(
            matches(&m, "$SYS/x"),
            ["sys"],
            "no first-level wildcard for $ topics"
        );
        assert_eq!(matches(&m, "a//"), ["all", "hash"]);
        assert_eq!(m.len(), 6);
    }

    #[test]
    fn removing_takes_only_the_named_value_and_prunes() {
        let mut m = Matcher::default();
        m.insert("a/+/c", "one");
        m.insert("a/+/c", "two");
        m.insert("a/#", "one");
        m.remove("a/+/c", |v| *v == "one");
        assert_eq!(matches(&m, "a/b/c"), ["one", "two"], "a/# of one stays");
        m.remove("a/+/c", |v| *v == "two");
        m.remove("a/#", |v| *v == "one");
        assert!(matches(&m, "a/b/c").is_empty());
        assert!(m.root.is_empty(), "empty branches are pruned");
        assert_eq!(m.len(), 0);
        m.remove("not/there", |_| true);
    }
}
