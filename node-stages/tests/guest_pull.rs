//! Guest pull on a real containerd 2.x: after the cri stage, a CRI PullImage for a guest-pull
//! handler (the pod's `io.kubernetes.cri.runtime-handler` annotation, what the kubelet sends) is
//! unpacked by OUR nydus proxy snapshotter, while a pull for a handler without guest pull uses
//! the default snapshotter. The snapshotter is a stub gRPC server on our proxy plugin's socket
//! that records every call (and refuses them); the image comes from a tiny in-test registry on
//! 127.0.0.1 (containerd talks plain HTTP to loopback registries).
//!
//! Runs on every containerd 2.x of the matrix; a missing one fails in CI.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::ctd::*;
use common::*;
use kata_deploy_stage::config::NodeFacts;
use kata_deploy_stage::hostfs::{sha256_hex, HostFs};

/// A minimal OCI registry serving one image (`kata/test:1`, one empty layer) over HTTP/1.1.
struct Registry {
    addr: String,
    requests: Arc<Mutex<Vec<String>>>,
}

fn registry() -> Registry {
    let layer = vec![0u8; 1024]; // an empty tar archive
    let layer_digest = format!("sha256:{}", sha256_hex(&layer));
    let config = format!(
        r#"{{"architecture":"{}","os":"linux","rootfs":{{"type":"layers","diff_ids":["{layer_digest}"]}},"config":{{}}}}"#,
        kata_deploy_stage::shims::kube_arch(std::env::consts::ARCH)
    );
    let config_digest = format!("sha256:{}", sha256_hex(config.as_bytes()));
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer_digest}","size":{}}}]}}"#,
        config.len(),
        layer.len()
    );
    let manifest_digest = format!("sha256:{}", sha256_hex(manifest.as_bytes()));
    let mut blobs: BTreeMap<String, (&'static str, Vec<u8>)> = BTreeMap::new();
    blobs.insert(
        "/v2/kata/test/manifests/1".into(),
        (
            "application/vnd.oci.image.manifest.v1+json",
            manifest.clone().into_bytes(),
        ),
    );
    blobs.insert(
        format!("/v2/kata/test/manifests/{manifest_digest}"),
        (
            "application/vnd.oci.image.manifest.v1+json",
            manifest.into_bytes(),
        ),
    );
    blobs.insert(
        format!("/v2/kata/test/blobs/{config_digest}"),
        ("application/octet-stream", config.into_bytes()),
    );
    blobs.insert(
        format!("/v2/kata/test/blobs/{layer_digest}"),
        ("application/octet-stream", layer),
    );
    blobs.insert("/v2/".into(), ("application/json", b"{}".to_vec()));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let requests = Arc::new(Mutex::new(Vec::new()));
    let log = requests.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            let mut raw = Vec::new();
            let _ = reader.read_until(b'\n', &mut raw);
            let line = String::from_utf8_lossy(&raw).to_string();
            if !line.contains("HTTP/1.") {
                // A TLS ClientHello (containerd tries https first): an HTTP answer makes it fall
                // back to plain HTTP for this loopback registry.
                let _ = stream.write_all(
                    b"HTTP/1.0 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
                continue;
            }
            loop {
                let mut h = Vec::new();
                if reader.read_until(b'\n', &mut h).unwrap_or(0) == 0 || h.trim_ascii().is_empty() {
                    break;
                }
            }
            let mut parts = line.split_whitespace();
            let (method, path) = (
                parts.next().unwrap_or(""),
                parts
                    .next()
                    .unwrap_or("")
                    .split('?')
                    .next()
                    .unwrap_or("")
                    .to_string(),
            );
            log.lock().unwrap().push(format!("{method} {path}"));
            let resp = match blobs.get(&path) {
                Some((ctype, body)) => {
                    let digest = format!("sha256:{}", sha256_hex(body));
                    let mut r = format!("HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nDocker-Content-Digest: {digest}\r\nConnection: close\r\n\r\n", body.len()).into_bytes();
                    if method != "HEAD" {
                        r.extend_from_slice(body);
                    }
                    r
                }
                None => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    .to_vec(),
            };
            let _ = stream.write_all(&resp);
            let _ = stream.flush();
            let mut rest = Vec::new();
            let _ = stream.set_read_timeout(Some(Duration::from_millis(10)));
            let _ = reader.read_to_end(&mut rest);
        }
    });
    Registry { addr, requests }
}

/// A stub snapshotter on a unix socket: records the gRPC method of every call and answers
/// NotFound (Stat) or Unavailable (anything else), so an unpack routed to it fails visibly.
fn stub_snapshotter(socket: &Path) -> Arc<Mutex<Vec<String>>> {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let log = calls.clone();
    std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
    let _ = std::fs::remove_file(socket);
    let std_listener = std::os::unix::net::UnixListener::bind(socket).unwrap();
    std_listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::UnixListener::from_std(std_listener).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let log = log.clone();
                tokio::spawn(async move {
                    let Ok(mut conn) = h2::server::handshake(stream).await else {
                        return;
                    };
                    while let Some(Ok((req, mut respond))) = conn.accept().await {
                        let method = req.uri().path().to_string();
                        log.lock().unwrap().push(method.clone());
                        let code = if method.ends_with("/Stat") { "5" } else { "14" };
                        let resp = http::Response::builder()
                            .status(200)
                            .header("content-type", "application/grpc")
                            .body(())
                            .unwrap();
                        if let Ok(mut send) = respond.send_response(resp, false) {
                            let mut trailers = http::HeaderMap::new();
                            trailers.insert("grpc-status", code.parse().unwrap());
                            trailers.insert(
                                "grpc-message",
                                "kata-deploy test stub snapshotter".parse().unwrap(),
                            );
                            let _ = send.send_trailers(trailers);
                        }
                    }
                });
            }
        });
    });
    calls
}

fn ld(field: u64, b: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    let mut key = (field << 3) | 2;
    loop {
        let byte = (key & 0x7f) as u8;
        key >>= 7;
        if key == 0 {
            v.push(byte);
            break;
        }
        v.push(byte | 0x80);
    }
    let mut len = b.len() as u64;
    loop {
        let byte = (len & 0x7f) as u8;
        len >>= 7;
        if len == 0 {
            v.push(byte);
            break;
        }
        v.push(byte | 0x80);
    }
    v.extend_from_slice(b);
    v
}

/// How a pull names the runtime handler it is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Naming {
    /// `ImageSpec.runtime_handler` (CRI v0.29+, kubelet feature RuntimeClassInImageCriApi).
    ImageSpecField,
    /// The pod annotation `io.containerd.cri.runtime-handler` (what Kata's guest-pull docs ask
    /// pods to carry; the only way containerd < 2.3 learns the handler of a pull).
    PodAnnotation,
}

/// CRI PullImage as the kubelet sends it for a pod of `handler`.
fn pull(sock: &Path, image: &str, handler: &str, naming: Naming) -> Result<Vec<u8>, String> {
    let (spec, sandbox) = match naming {
        Naming::ImageSpecField => (
            [ld(1, image.as_bytes()), ld(19, handler.as_bytes())].concat(),
            ld(2, b"n"),
        ),
        Naming::PodAnnotation => (
            ld(1, image.as_bytes()),
            ld(
                7,
                &[
                    ld(1, b"io.containerd.cri.runtime-handler"),
                    ld(2, handler.as_bytes()),
                ]
                .concat(),
            ),
        ),
    };
    let req = [ld(1, &spec), ld(3, &sandbox)].concat();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(60),
            kata_deploy_stage::cri_client::unary_call(
                sock,
                "/runtime.v1.ImageService/PullImage",
                &req,
            ),
        )
        .await
        .map_err(|_| "PullImage timed out".to_string())?
    })
}

static ROUTED: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// CRI RemoveImage.
fn remove_image(sock: &Path, image: &str) -> Result<Vec<u8>, String> {
    let req = ld(1, &ld(1, image.as_bytes()));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(kata_deploy_stage::cri_client::unary_call(
        sock,
        "/runtime.v1.ImageService/RemoveImage",
        &req,
    ))
}

#[test]
fn guest_pull_handler_pulls_through_our_nydus_snapshotter_on_containerd_2() {
    let bins: Vec<CtdBin> = matrix_bins()
        .into_iter()
        .filter(|b| b.major_minor().0 >= 2)
        .collect();
    if bins.is_empty() {
        skip_or_fail("no containerd 2.x (hack/testenv/build.sh builds them)");
        return;
    }
    let reg = registry();
    let mut failures = Vec::new();
    for (n, bin) in bins.iter().enumerate() {
        // A multi-install suffix gives this run its own proxy socket path on the real /run.
        let suffix = format!("gp{}x{n}", std::process::id());
        let socket = PathBuf::from(format!(
            "/run/nydus-for-kata-tee-{suffix}/containerd-nydus-grpc.sock"
        ));
        let calls = stub_snapshotter(&socket);
        let work = tempfile::Builder::new()
            .prefix("kata-gp")
            .tempdir()
            .unwrap();
        let host = bare_host(work.path());
        // The node's own default config, with the native snapshotter as default (overlayfs may
        // be unavailable where the tests run).
        let mut doc: toml_edit::DocumentMut = bin.config_default().parse().unwrap();
        doc["plugins"]["io.containerd.cri.v1.images"]["snapshotter"] = toml_edit::value("native");
        std::fs::write(host.join("etc/containerd/config.toml"), doc.to_string()).unwrap();
        let rt = RealContainerd::new(bin.clone(), &host, work.path());
        rt.start();
        rt.wait_ready();
        let cfg = config(&format!("multiInstallSuffix: {suffix}\nruntimeReadyTimeoutSeconds: 60\nshims:\n  - name: qemu\n  - name: qemu-coco-dev\n    containerdSnapshotter: nydus\n"));
        let facts = NodeFacts {
            name: Some("n".into()),
            machine_id: Some("0123456789abcdef".into()),
            container_runtime_version: Some(bin.runtime_version.clone()),
            ..Default::default()
        };
        install(&HostFs::new(&host, false), &cfg, &facts, &rt).unwrap();
        let image = format!("{}/kata/test:1", reg.addr);

        let guest_handler = format!("kata-qemu-coco-dev-{suffix}");
        let mut routed_by = Vec::new();
        for naming in [Naming::ImageSpecField, Naming::PodAnnotation] {
            let before = calls.lock().unwrap().len();
            let res = pull(&rt.sock, &image, &guest_handler, naming);
            let routed: Vec<String> = calls.lock().unwrap()[before..].to_vec();
            let reached = routed
                .iter()
                .any(|m| m.starts_with("/containerd.services.snapshots.v1.Snapshots/"));
            eprintln!(
                "containerd {} {naming:?}: snapshotter calls {routed:?}, pull {:?}",
                bin.label,
                res.as_ref().err()
            );
            if reached {
                // Our stub refuses every call: a pull that went through it cannot succeed.
                if res.is_ok() {
                    failures.push(format!("containerd {} {naming:?}: pull succeeded although it reached our refusing snapshotter", bin.label));
                }
                routed_by.push(naming);
            } else if let Err(e) = &res {
                failures.push(format!(
                    "containerd {} {naming:?}: pull failed without reaching our snapshotter: {e}",
                    bin.label
                ));
            } else {
                // Pulled with the default snapshotter: remove it so the next naming pulls again.
                let _ = remove_image(&rt.sock, &image);
            }
        }
        // Kata's documented pod annotation must route on every 2.x; the CRI field where supported.
        if !routed_by.contains(&Naming::PodAnnotation) {
            failures.push(format!("containerd {}: a guest-pull pod's pull never reached our nydus snapshotter (registry saw {:?})", bin.label, reg.requests.lock().unwrap()));
        }
        if bin.major_minor() >= (2, 3) && !routed_by.contains(&Naming::ImageSpecField) {
            failures.push(format!("containerd {}: ImageSpec.runtime_handler did not route the pull to our snapshotter", bin.label));
        }
        ROUTED
            .lock()
            .unwrap()
            .push(format!("{}: {routed_by:?}", bin.label));

        let before = calls.lock().unwrap().len();
        let host_pull = pull(
            &rt.sock,
            &image,
            &format!("kata-qemu-{suffix}"),
            Naming::ImageSpecField,
        )
        .and(pull(
            &rt.sock,
            &image,
            &format!("kata-qemu-{suffix}"),
            Naming::PodAnnotation,
        ));
        let touched: Vec<String> = calls.lock().unwrap()[before..].to_vec();
        if let Err(e) = &host_pull {
            failures.push(format!(
                "containerd {}: the pull for a handler without guest pull failed: {e}",
                bin.label
            ));
        }
        if !touched.is_empty() {
            failures.push(format!("containerd {}: a pull for a handler without guest pull reached our snapshotter: {touched:?}", bin.label));
        }
        uninstall(&HostFs::new(&host, false), &cfg, &facts, &rt).unwrap();
        drop(rt);
        let _ = std::fs::remove_dir_all(socket.parent().unwrap());
    }
    eprintln!(
        "guest-pull routing (naming that reached our snapshotter): {:?}",
        ROUTED.lock().unwrap()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
