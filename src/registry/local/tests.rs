use super::*;
use std::os::unix::fs::PermissionsExt;

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).expect("stat").mode() & 0o7777
}

fn instance(id: &str) -> Instance {
    Instance::from_json(
        format!(r#"{{"name":"lobby","id":"{id}","host":"127.0.0.1","port":7000}}"#).as_bytes(),
    )
    .expect("instance")
}

#[test]
fn the_directory_is_created_private_and_an_untrusted_one_refused() {
    let base = tempfile::tempdir().expect("dir");
    let dir = base.path().join("registry");
    LocalRegistry::open(dir.clone(), None, Duration::from_secs(3)).expect("opens");
    assert_eq!(mode(&dir), 0o700);

    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let error = LocalRegistry::open(dir.clone(), None, Duration::from_secs(3))
        .err()
        .expect("refused");
    assert!(
        error.contains("writable by group or others (mode 0777)"),
        "{error}"
    );
    assert!(error.contains(&dir.display().to_string()), "{error}");

    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        std::os::unix::fs::chown(&dir, Some(65534), None).expect("chown");
        let error = LocalRegistry::open(dir, None, Duration::from_secs(3))
            .err()
            .expect("refused");
        assert!(error.contains("owned by uid 65534"), "{error}");
        assert!(error.contains("remove it"), "{error}");
    } else {
        eprintln!("not root: the foreign-owner case needs chown");
    }
}

#[tokio::test]
async fn hostile_entries_are_skipped_and_the_scan_goes_on() {
    let base = tempfile::tempdir().expect("dir");
    let registry =
        LocalRegistry::open(base.path().join("r"), None, Duration::from_secs(30)).expect("opens");
    let lease = registry
        .register(&instance("good"))
        .await
        .expect("registers");
    let dir = registry.service_dir("lobby");
    std::os::unix::fs::symlink("/dev/zero", dir.join("zero.json")).expect("symlink");
    let fifo =
        std::ffi::CString::new(dir.join("fifo.json").to_string_lossy().as_bytes()).expect("path");
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0, "mkfifo");
    std::fs::write(dir.join("big.json"), vec![b' '; 100 * 1024]).expect("big");
    std::fs::create_dir(dir.join("dir.json")).expect("dir entry");

    let (entries, _) =
        tokio::time::timeout(Duration::from_secs(10), scan(&dir, Duration::from_secs(30)))
            .await
            .expect("the scan does not hang on a FIFO")
            .expect("the scan succeeds");
    let reasons: Vec<(String, Result<String, String>)> = entries
        .into_iter()
        .map(|e| {
            let name = Path::new(&e.key)
                .file_name()
                .expect("name")
                .to_string_lossy()
                .into_owned();
            (name, e.value.map(|i| i.id))
        })
        .collect();
    assert_eq!(reasons.len(), 5, "{reasons:?}");
    let find = |name: &str| {
        reasons
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, r)| r.clone())
    };
    assert_eq!(find("good.json"), Some(Ok("good".into())));
    assert!(find("zero.json").is_some_and(|r| r.is_err_and(|e| e.contains("symbolic link"))));
    assert!(find("fifo.json").is_some_and(|r| r.is_err_and(|e| e.contains("not a regular file"))));
    assert!(find("dir.json").is_some_and(|r| r.is_err_and(|e| e.contains("not a regular file"))));
    assert!(find("big.json").is_some_and(|r| r.is_err_and(|e| e.contains("more than the 65536"))));
    Box::new(lease).revoke().await.expect("revokes");
}

#[tokio::test]
async fn a_planted_temp_file_is_never_written_through() {
    let base = tempfile::tempdir().expect("dir");
    let registry =
        LocalRegistry::open(base.path().join("r"), None, Duration::from_secs(30)).expect("opens");
    let dir = registry.service_dir("lobby");
    registry.create_dir(&dir).expect("service dir");
    let victim = base.path().join("victim");
    std::fs::write(&victim, "precious").expect("victim");
    std::os::unix::fs::symlink(&victim, dir.join("good.json.tmp")).expect("plant");

    registry
        .register(&instance("good"))
        .await
        .expect("registers");
    assert_eq!(
        std::fs::read_to_string(&victim).expect("victim"),
        "precious"
    );
    assert_eq!(mode(&dir.join("good.json")), 0o600);
    let (entries, _) = scan(&dir, Duration::from_secs(30)).await.expect("scan");
    assert_eq!(entries.len(), 1);
}

#[tokio::test]
async fn leftover_temp_files_are_removed_after_the_grace() {
    let base = tempfile::tempdir().expect("dir");
    let dir = base.path().join("lobby");
    std::fs::create_dir(&dir).expect("dir");
    std::fs::write(dir.join("crashed.json.tmp"), "{").expect("leftover");
    scan(&dir, Duration::from_secs(3600)).await.expect("scan");
    assert!(dir.join("crashed.json.tmp").exists(), "young: kept");
    scan(&dir, Duration::ZERO).await.expect("scan");
    assert!(!dir.join("crashed.json.tmp").exists(), "old: removed");
}
