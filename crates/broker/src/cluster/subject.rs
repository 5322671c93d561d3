//! The MQTT topic <-> NATS subject mapping of nats-server's own MQTT listener
//! (`mqttToNATSSubjectConversion` and `natsSubjectToMQTTTopic` in server/mqtt.go), so NATS
//! services see moatmq's traffic on the subjects they would see behind nats-server.
//!
//! Topic to subject: `/` between levels is `.`; an empty level is the token `/` (a
//! leading `/` is `/.`, a trailing or doubled one `./`); a `.` inside a level is `//`; a
//! subject that would end with `.` gets a final `/`. Topics with whitespace or DEL have
//! no subject (nats-server refuses them too), nor do wildcards. Subject to topic: the
//! exact reverse, `.` is `/`, `//` is `.`, `/.` is `/`, and any other `/` is dropped.

/// The subject of `topic`, or `None` when nats-server's mapping has none.
pub fn to_subject(topic: &str) -> Option<String> {
    if topic.is_empty() {
        return None;
    }
    let bytes = topic.as_bytes();
    let end = bytes.len() - 1;
    let mut out = String::with_capacity(topic.len() + 4);
    for (i, c) in topic.char_indices() {
        match c {
            '/' => {
                if i == 0 || out.ends_with('.') {
                    out.push_str("/.");
                } else if i == end || bytes[i + 1] == b'/' {
                    out.push_str("./");
                } else {
                    out.push('.');
                }
            }
            '.' => out.push_str("//"),
            ' ' | '\t' | '\n' | '\r' | '\x0c' | '\x7f' | '+' | '#' => return None,
            c => out.push(c),
        }
    }
    if out.ends_with('.') {
        out.push('/');
    }
    Some(out)
}

/// The topic of `subject` (the part after the prefix).
pub fn to_topic(subject: &str) -> String {
    let bytes = subject.as_bytes();
    let mut out = String::with_capacity(subject.len());
    let mut chars = subject.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '/' => match bytes.get(i + 1) {
                Some(b'.') => {
                    out.push('/');
                    chars.next();
                }
                Some(b'/') => {
                    out.push('.');
                    chars.next();
                }
                _ => {}
            },
            '.' => out.push('/'),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn nats_server_examples() {
        for (topic, subject) in [
            ("a/b/c", "a.b.c"),
            ("/a", "/.a"),
            ("a/", "a./"),
            ("a//b", "a./.b"),
            ("/", "/./"),
            ("//", "/././"),
            ("a.b", "a//b"),
            ("a/b.c/d", "a.b//c.d"),
            ("sensors", "sensors"),
        ] {
            assert_eq!(to_subject(topic).as_deref(), Some(subject), "{topic}");
            assert_eq!(to_topic(subject), topic, "{subject}");
        }
    }

    #[test]
    fn unmappable_topics_have_no_subject() {
        for topic in ["", "a b", "a\tb", "a/+", "a/#", "x\x7f"] {
            assert_eq!(to_subject(topic), None, "{topic:?}");
        }
    }

    proptest! {
        /// Every mappable topic maps to a valid NATS subject (no empty token, no
        /// whitespace) and back to itself.
        #[test]
        fn round_trip(topic in "[a-z./é$]{1,12}") {
            let subject = to_subject(&topic).expect("no whitespace or wildcard");
            prop_assert!(subject.split('.').all(|t| !t.is_empty()), "{subject}");
            prop_assert_eq!(to_topic(&subject), topic);
        }
    }
}
