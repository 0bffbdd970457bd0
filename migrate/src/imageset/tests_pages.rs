//! Page images written by a stream-mode page server: listed by size, never accepted from a peer.

use super::tests::sample_info;
use super::*;

fn is_page(name: &str) -> bool {
    name.starts_with("pages-") && name.ends_with(".img")
}

/// A sealed set (`core-1.img`), then two page images written after the seal, as the page server
/// writes them next to the received files.
fn with_pages() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("core-1.img"), b"core").unwrap();
    seal(d.path(), sample_info()).unwrap();
    std::fs::write(d.path().join("pages-1.img"), vec![7u8; 8192]).unwrap();
    std::fs::write(d.path().join("pages-2.img"), vec![9u8; 4096]).unwrap();
    d
}

#[test]
fn page_images_are_listed_by_size_and_verified_by_listing_and_size() {
    let d = with_pages();
    // Before they are listed, they are extra files.
    assert!(matches!(verify(d.path()), Err(ImageSetError::Extra { .. })));
    let added = add_page_server_images(d.path(), is_page).unwrap();
    assert_eq!(
        added,
        vec![
            PageImage {
                path: "pages-1.img".into(),
                size: 8192
            },
            PageImage {
                path: "pages-2.img".into(),
                size: 4096
            },
        ]
    );
    let m = verify(d.path()).unwrap();
    assert_eq!(m.page_server, added);
    assert_eq!(m.files.len(), 1);
    // Same content, same size: not hashed, so not noticed; a size change or a missing page
    // image is.
    std::fs::write(d.path().join("pages-1.img"), vec![8u8; 8192]).unwrap();
    verify(d.path()).unwrap();
    std::fs::write(d.path().join("pages-1.img"), vec![8u8; 8191]).unwrap();
    assert!(matches!(
        verify(d.path()),
        Err(ImageSetError::SizeMismatch { .. })
    ));
    std::fs::remove_file(d.path().join("pages-1.img")).unwrap();
    assert!(matches!(
        verify(d.path()),
        Err(ImageSetError::Missing { .. })
    ));
    // The hashed files are still hashed.
    std::fs::write(d.path().join("pages-1.img"), vec![8u8; 8192]).unwrap();
    std::fs::write(d.path().join("core-1.img"), b"CORE").unwrap();
    assert!(matches!(
        verify(d.path()),
        Err(ImageSetError::HashMismatch { .. })
    ));
}

#[test]
fn a_received_manifest_naming_page_images_is_refused() {
    let d = with_pages();
    add_page_server_images(d.path(), is_page).unwrap();
    let m = read_manifest(d.path()).unwrap();
    assert!(refuse_page_server_entries(&m).is_err());
    // A second listing (the manifest now names page images, as a peer's could) is refused.
    assert!(matches!(
        add_page_server_images(d.path(), is_page),
        Err(ImageSetError::BadEntry { .. })
    ));
    // Without them, nothing to refuse, and the manifest is written as before (no key).
    let d = with_pages();
    let m = read_manifest(d.path()).unwrap();
    refuse_page_server_entries(&m).unwrap();
    let text = std::fs::read_to_string(d.path().join(MANIFEST)).unwrap();
    assert!(!text.contains("page_server"), "{text}");
}

#[test]
fn a_page_image_listed_twice_or_as_a_file_is_refused() {
    let d = with_pages();
    add_page_server_images(d.path(), is_page).unwrap();
    let path = d.path().join(MANIFEST);
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    v["page_server"][1]["path"] = "core-1.img".into();
    let bad = serde_json::to_vec(&v).unwrap();
    assert!(matches!(
        parse_manifest(&bad),
        Err(ImageSetError::BadEntry { .. })
    ));
    v["page_server"][1]["path"] = "pages-1.img".into();
    let bad = serde_json::to_vec(&v).unwrap();
    assert!(matches!(
        parse_manifest(&bad),
        Err(ImageSetError::BadEntry { .. })
    ));
    v["page_server"][1]["path"] = "../x".into();
    let bad = serde_json::to_vec(&v).unwrap();
    assert!(matches!(
        parse_manifest(&bad),
        Err(ImageSetError::BadEntry { .. })
    ));
}

#[test]
fn a_restored_sets_pages_are_removed_and_the_rest_kept() {
    let d = with_pages();
    std::fs::write(d.path().join("pagemap-1.img"), b"map").unwrap();
    assert_eq!(remove_pages(d.path()).unwrap(), 8192 + 4096);
    let mut left: Vec<String> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(left, ["core-1.img", MANIFEST, "pagemap-1.img"]);
    assert_eq!(remove_pages(d.path()).unwrap(), 0);
}
