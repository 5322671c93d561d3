use proptest::prelude::*;

use super::*;
use crate::decode_log_image;
use crate::record::{open_record, FileId, TAG_LEN};

fn valid_image() -> Vec<u8> {
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

#[test]
fn valid_image_decodes() {
    assert_eq!(
        decode_log_image(&key(), &valid_image()).unwrap(),
        vec![msg("c", "world")]
    );
}
