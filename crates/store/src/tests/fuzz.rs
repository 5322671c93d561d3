use proptest::prelude::*;

use super::*;
use crate::decode_log_image;
use crate::record::{open_record, FileId, TAG_LEN};

fn valid_image() -> Vec<u8> {
    static IMAGE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    IMAGE.get_or_init(make_valid_image).clone()
}

fn make_valid_image() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _) = open(dir.path()).unwrap();
    s.set(v5_msg("a/b", "hello")).unwrap();
    s.flush().unwrap();
    s.set(msg("c", "world")).unwrap();
    s.clear("a/b");
    s.flush().unwrap();
    std::fs::read(log_path(dir.path())).unwrap()
}

/// Seals arbitrary plaintext as a record that authenticates, to reach the decoder.
fn seal_raw(file_id: &FileId, seq: u64, plain: &[u8]) -> (u32, Vec<u8>) {
    use aes_gcm::aead::{Aead, Payload};
    use aes_gcm::Nonce;
    let len = (plain.len() + TAG_LEN) as u32;
    let nonce = [9u8; 12];
    let mut aad = Vec::new();
    aad.extend_from_slice(b"moatmq-store-record");
    aad.extend_from_slice(file_id);
    aad.extend_from_slice(&seq.to_le_bytes());
    aad.extend_from_slice(&len.to_le_bytes());
    let ct = record::cipher(&key())
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: plain,
                aad: &aad,
            },
        )
        .unwrap();
    let mut body = nonce.to_vec();
    body.extend_from_slice(&ct);
    (len, body)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_images_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = decode_log_image(&key(), &bytes);
    }

    #[test]
    fn mutated_valid_images_never_panic(
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut in any::<usize>(),
    ) {
        let mut img = valid_image();
        for (at, v) in edits {
            let i = at % img.len();
            img[i] = v;
        }
        img.truncate(cut % (img.len() + 1));
        let _ = decode_log_image(&key(), &img);
    }

    #[test]
    fn authenticated_random_plaintext_never_panics(
        plain in proptest::collection::vec(any::<u8>(), 0..512),
        seq in any::<u64>(),
    ) {
        let file_id = [3u8; 16];
        let (len, body) = seal_raw(&file_id, seq, &plain);
        let _ = open_record(&record::cipher(&key()), &file_id, seq, len, &body);
    }
}

fn valid_mark() -> Vec<u8> {
    static MARK: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    MARK.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        store_with(dir.path(), 2);
        std::fs::read(mark_path(dir.path())).unwrap()
    })
    .clone()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// The high-water mark is read from disk too: damaged or random, it never panics, and
    /// a mark with both slots edited never passes for a valid one.
    #[test]
    fn mutated_marks_never_panic(
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut in any::<usize>(),
        random in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let cipher = record::cipher(&key());
        let orig = valid_mark();
        let mut m = orig.clone();
        for (at, v) in &edits {
            let i = at % m.len();
            m[i] = *v;
        }
        let slot = crate::mark::SLOT_LEN;
        let both = m[..slot] != orig[..slot] && m[4096..] != orig[4096..];
        std::fs::write(mark_path(dir.path()), &m).unwrap();
        let found = crate::mark::read(dir.path(), &cipher).unwrap();
        if both {
            prop_assert!(matches!(found, crate::mark::Found::Unreadable));
        }
        m.truncate(cut % (m.len() + 1));
        std::fs::write(mark_path(dir.path()), &m).unwrap();
        let _ = crate::mark::read(dir.path(), &cipher).unwrap();
        std::fs::write(mark_path(dir.path()), &random).unwrap();
        let _ = crate::mark::read(dir.path(), &cipher).unwrap();
    }
}

#[test]
fn valid_image_decodes() {
    assert_eq!(
        decode_log_image(&key(), &valid_image()).unwrap(),
        vec![msg("c", "world")]
    );
}

#[test]
fn store_and_job_are_send() {
    fn send<T: Send>() {}
    send::<Store>();
    send::<crate::CompactionJob>();
}

/// Known-bad log images (key `11` * 32) in `testdata/bad-*.bin`, each refused without a
/// panic. Regenerate with `MOATMQ_WRITE_CORPUS=1 cargo test -p moatmq-store corpus`.
#[test]
fn known_bad_corpus_is_refused() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
    if std::env::var_os("MOATMQ_WRITE_CORPUS").is_some() {
        write_corpus(&dir);
    }
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "bin") {
            let image = std::fs::read(&path).unwrap();
            let res = decode_log_image(&key(), &image);
            assert!(res.is_err(), "{} was accepted", path.display());
            seen += 1;
        }
    }
    assert!(seen >= 6, "corpus missing");
}

fn write_corpus(dir: &Path) {
    let good = valid_image();
    let f = frames(&good);
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    let mut b = good.clone();
    b[f[0].0 + 30] ^= 1;
    cases.push(("bad-flipped-record", b));
    let mut b = good.clone();
    b[f[0].0] ^= 1;
    cases.push(("bad-length-prefix", b));
    let mut b = good.clone();
    b.drain(f[0].0..f[0].1);
    cases.push(("bad-missing-record", b));
    let mut b = good[..f[0].0].to_vec();
    b.extend_from_slice(&good[f[1].0..f[1].1]);
    b.extend_from_slice(&good[f[0].0..f[0].1]);
    cases.push(("bad-swapped-records", b));
    let mut b = good.clone();
    b[20] ^= 1;
    cases.push(("bad-header-file-id", b));
    cases.push(("bad-short-header", good[..20].to_vec()));
    let mut b = good.clone();
    b[0] = b'X';
    cases.push(("bad-magic", b));
    let mut b = good.clone();
    let n = b.len();
    b[n - 1] ^= 1;
    cases.push(("bad-last-tag", b));
    for (name, bytes) in cases {
        std::fs::write(dir.join(format!("{name}.bin")), bytes).unwrap();
    }
}

/// Known-bad high-water marks (key `11` * 32) in `testdata/mark/bad-*.bin`: none reads as
/// a valid mark. Regenerate with `MOATMQ_WRITE_CORPUS=1 cargo test -p moatmq-store marks`.
#[test]
fn known_bad_marks_are_unreadable() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/mark");
    if std::env::var_os("MOATMQ_WRITE_CORPUS").is_some() {
        write_mark_corpus(&dir);
    }
    let store = tempfile::tempdir().unwrap();
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "bin") {
            std::fs::copy(&path, mark_path(store.path())).unwrap();
            let found = crate::mark::read(store.path(), &record::cipher(&key())).unwrap();
            assert!(
                matches!(found, crate::mark::Found::Unreadable),
                "{} was read as {found:?}",
                path.display()
            );
            seen += 1;
        }
    }
    assert!(seen >= 4, "mark corpus missing");
}

fn write_mark_corpus(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let good = valid_mark();
    let slot = crate::mark::SLOT_LEN;
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    let mut b = good.clone();
    b[30] ^= 1;
    b[4096 + 30] ^= 1;
    cases.push(("bad-both-slots-flipped", b));
    let mut b = good.clone();
    let (s0, s1) = (good[..slot].to_vec(), good[4096..4096 + slot].to_vec());
    b[..slot].copy_from_slice(&s1);
    b[4096..4096 + slot].copy_from_slice(&s0);
    cases.push(("bad-slots-swapped", b));
    cases.push(("bad-short", good[..4096 + slot - 1].to_vec()));
    let other = tempfile::tempdir().unwrap();
    Store::open(other.path(), other_key(), LIMITS).unwrap();
    cases.push((
        "bad-other-key",
        std::fs::read(mark_path(other.path())).unwrap(),
    ));
    for (name, bytes) in cases {
        std::fs::write(dir.join(format!("{name}.bin")), bytes).unwrap();
    }
}
