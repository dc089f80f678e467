//! A minimal CRI client (gRPC over HTTP/2 on the runtime's unix socket) asking the running
//! runtime which handlers it serves: `RuntimeService/Status` with verbose info. This is the
//! direct proof that the runtime loaded what we wrote. Hand-rolled protobuf (three fields) to
//! avoid a code generator and a large dependency tree in a privileged image.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;

/// What the runtime reports about itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuntimeReport {
    /// Handlers from `runtime_handlers` (CRI >= 1.30 runtimes), if any.
    pub runtime_handlers: Vec<String>,
    /// Handlers from the verbose `config` info (containerd: containerd.runtimes).
    pub config_handlers: Vec<String>,
    /// RuntimeReady condition.
    pub runtime_ready: bool,
    /// The CRI plugin's effective configuration as it reports it (verbose Status `config`, JSON).
    pub config_json: Option<String>,
}

impl RuntimeReport {
    /// Every handler the runtime reports, from either source.
    pub fn handlers(&self) -> Vec<String> {
        let mut v = self.runtime_handlers.clone();
        for h in &self.config_handlers {
            if !v.contains(h) {
                v.push(h.clone());
            }
        }
        v.sort();
        v
    }
}

fn varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos)?;
        *pos += 1;
        v |= ((b & 0x7f) as u64) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// One protobuf field value: a varint (Ok) or length-delimited bytes (Err).
type FieldValue<'a> = Result<u64, &'a [u8]>;

/// Protobuf fields of one message: (field number, value).
fn fields(buf: &[u8]) -> Option<Vec<(u64, FieldValue<'_>)>> {
    let mut pos = 0;
    let mut out = Vec::new();
    while pos < buf.len() {
        let key = varint(buf, &mut pos)?;
        match key & 7 {
            0 => out.push((key >> 3, Ok(varint(buf, &mut pos)?))),
            2 => {
                let len = varint(buf, &mut pos)? as usize;
                let b = buf.get(pos..pos + len)?;
                pos += len;
                out.push((key >> 3, Err(b)));
            }
            1 => pos += 8,
            5 => pos += 4,
            _ => return None,
        }
    }
    Some(out)
}

fn string_field(msg: &[u8], n: u64) -> Option<String> {
    fields(msg)?.into_iter().find_map(|(f, v)| {
        if f == n {
            v.err().map(|b| String::from_utf8_lossy(b).into_owned())
        } else {
            None
        }
    })
}

/// Decodes a StatusResponse.
pub fn decode_status(msg: &[u8]) -> Option<RuntimeReport> {
    let mut r = RuntimeReport::default();
    for (f, v) in fields(msg)? {
        let Err(b) = v else { continue };
        match f {
            1 => {
                // RuntimeStatus { repeated RuntimeCondition conditions = 1 }
                for (cf, cv) in fields(b)? {
                    if let (1, Err(cond)) = (cf, cv) {
                        let ty = string_field(cond, 1).unwrap_or_default();
                        let ok = fields(cond)?.iter().any(|(n, v)| *n == 2 && *v == Ok(1));
                        if ty == "RuntimeReady" {
                            r.runtime_ready = ok;
                        }
                    }
                }
            }
            // map<string,string> info entry { key = 1, value = 2 }
            2 if string_field(b, 1).as_deref() == Some("config") => {
                if let Some(cfg) = string_field(b, 2) {
                    r.config_handlers = handlers_from_config_json(&cfg);
                    r.config_json = Some(cfg);
                }
            }
            3 => {
                if let Some(name) = string_field(b, 1) {
                    if !name.is_empty() {
                        r.runtime_handlers.push(name);
                    }
                }
            }
            _ => {}
        }
    }
    Some(r)
}

/// A pod sandbox the runtime runs, as `ListPodSandbox` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sandbox {
    /// Pod namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// The runtime handler that runs it ("" for the default runtime).
    pub handler: String,
    /// SANDBOX_READY (running), not NOTREADY (stopped, only its record is left).
    pub ready: bool,
}

/// Decodes a ListPodSandboxResponse { repeated PodSandbox items = 1 }; PodSandbox: metadata = 2
/// (PodSandboxMetadata: name = 1, namespace = 3), state = 3 (READY = 0, so absent when ready),
/// runtime_handler = 7.
pub fn decode_sandboxes(msg: &[u8]) -> Option<Vec<Sandbox>> {
    let mut out = Vec::new();
    for (f, v) in fields(msg)? {
        let (1, Err(item)) = (f, v) else { continue };
        let item_fields = fields(item)?;
        let meta = item_fields.iter().find_map(|(n, v)| match (n, v) {
            (2, Err(b)) => Some(*b),
            _ => None,
        });
        let state = item_fields.iter().find_map(|(n, v)| match (n, v) {
            (3, Ok(s)) => Some(*s),
            _ => None,
        });
        out.push(Sandbox {
            namespace: meta.and_then(|m| string_field(m, 3)).unwrap_or_default(),
            name: meta.and_then(|m| string_field(m, 1)).unwrap_or_default(),
            handler: string_field(item, 7).unwrap_or_default(),
            ready: state.unwrap_or(0) == 0,
        });
    }
    Some(out)
}

/// Lists the runtime's pod sandboxes (bounded by `timeout`).
pub fn list_sandboxes(socket: &Path, timeout: Duration) -> Result<Vec<Sandbox>, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let call = unary_call(socket, "/runtime.v1.RuntimeService/ListPodSandbox", &[]);
        let msg = tokio::time::timeout(timeout, call)
            .await
            .map_err(|_| format!("CRI ListPodSandbox on {} timed out", socket.display()))??;
        decode_sandboxes(&msg).ok_or_else(|| {
            format!(
                "CRI ListPodSandbox on {}: malformed response",
                socket.display()
            )
        })
    })
}

/// Handler names from containerd's verbose CRI config JSON (`containerd.runtimes` keys).
pub fn handlers_from_config_json(json: &str) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
    let mut names: Vec<String> = v
        .get("containerd")
        .and_then(|c| c.get("runtimes"))
        .and_then(|r| r.as_object())
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    names.sort();
    names
}

/// Asks the runtime at `socket` for its status (bounded by `timeout`).
pub fn query_status(socket: &Path, timeout: Duration) -> Result<RuntimeReport, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        tokio::time::timeout(timeout, status_call(socket))
            .await
            .map_err(|_| format!("CRI Status on {} timed out", socket.display()))?
    })
}

async fn status_call(socket: &Path) -> Result<RuntimeReport, String> {
    // StatusRequest { verbose: true }.
    let msg = unary_call(socket, "/runtime.v1.RuntimeService/Status", &[0x08, 0x01]).await?;
    decode_status(&msg).ok_or_else(|| {
        format!(
            "CRI Status on {}: decode: malformed StatusResponse",
            socket.display()
        )
    })
}

/// One unary gRPC call over a unix socket: the encoded request message in, the encoded response
/// message out (a non-zero grpc-status is an error naming the method and socket).
pub async fn unary_call(socket: &Path, method: &str, request: &[u8]) -> Result<Vec<u8>, String> {
    let name = method.rsplit('/').next().unwrap_or(method);
    let err = |what: &str, e: &dyn std::fmt::Display| {
        format!("CRI {name} on {}: {what}: {e}", socket.display())
    };
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| err("connect", &e))?;
    let (client, conn) = h2::client::handshake(stream)
        .await
        .map_err(|e| err("http2 handshake", &e))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut client = client.ready().await.map_err(|e| err("http2", &e))?;
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://localhost{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request");
    let (resp, mut send) = client
        .send_request(req, false)
        .map_err(|e| err("send", &e))?;
    // gRPC frame: uncompressed flag, big-endian length, message.
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(request.len() as u32).to_be_bytes());
    frame.extend_from_slice(request);
    send.send_data(Bytes::from(frame), true)
        .map_err(|e| err("send", &e))?;
    let resp = resp.await.map_err(|e| err("response", &e))?;
    let header_status = resp
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let header_msg = resp
        .headers()
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut body = resp.into_body();
    let mut buf = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| err("body", &e))?;
        let _ = body.flow_control().release_capacity(chunk.len());
        buf.extend_from_slice(&chunk);
    }
    let trailers = body.trailers().await.map_err(|e| err("trailers", &e))?;
    let status = trailers
        .as_ref()
        .and_then(|t| t.get("grpc-status"))
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or(header_status);
    if status.as_deref() != Some("0") {
        let msg = trailers
            .as_ref()
            .and_then(|t| t.get("grpc-message"))
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .or(header_msg)
            .unwrap_or_default();
        return Err(format!(
            "CRI {name} on {}: grpc-status {:?} {msg} (is the CRI plugin loaded?)",
            socket.display(),
            status
        ));
    }
    if buf.len() < 5 {
        return Err(err("response", &"empty message"));
    }
    Ok(buf[5..].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ld(field: u64, b: &[u8]) -> Vec<u8> {
        let mut v = vec![((field << 3) | 2) as u8, b.len() as u8];
        v.extend_from_slice(b);
        v
    }

    #[test]
    fn decodes_status_response() {
        let cond = [ld(1, b"RuntimeReady"), vec![0x10, 0x01]].concat();
        let status = ld(1, &cond);
        let cfg = r#"{"containerd":{"runtimes":{"runc":{},"kata-qemu":{}}}}"#;
        let entry = [ld(1, b"config"), ld(2, cfg.as_bytes())].concat();
        let handler = ld(1, b"kata-clh");
        let msg = [ld(1, &status), ld(2, &entry), ld(3, &handler)].concat();
        let r = decode_status(&msg).unwrap();
        assert!(r.runtime_ready);
        assert_eq!(r.config_handlers, ["kata-qemu", "runc"]);
        assert_eq!(r.handlers(), ["kata-clh", "kata-qemu", "runc"]);
    }

    #[test]
    fn decodes_pod_sandboxes_with_their_handler_and_state() {
        let sandbox = |name: &[u8], ns: &[u8], handler: &[u8], notready: bool| {
            let meta = [ld(1, name), ld(2, b"uid"), ld(3, ns)].concat();
            let state = if notready { vec![0x18, 0x01] } else { vec![] };
            ld(
                1,
                &[ld(1, b"id"), ld(2, &meta), state, ld(7, handler)].concat(),
            )
        };
        let msg = [
            sandbox(b"web", b"team", b"kata-qemu", false),
            sandbox(b"old", b"team", b"kata-qemu", true),
            sandbox(b"plain", b"default", b"", false),
        ]
        .concat();
        let got = decode_sandboxes(&msg).unwrap();
        assert_eq!(
            got,
            vec![
                Sandbox {
                    namespace: "team".into(),
                    name: "web".into(),
                    handler: "kata-qemu".into(),
                    ready: true
                },
                Sandbox {
                    namespace: "team".into(),
                    name: "old".into(),
                    handler: "kata-qemu".into(),
                    ready: false
                },
                Sandbox {
                    namespace: "default".into(),
                    name: "plain".into(),
                    handler: "".into(),
                    ready: true
                },
            ]
        );
        assert_eq!(decode_sandboxes(&[]).unwrap(), vec![]);
    }

    #[test]
    fn garbage_is_rejected() {
        assert!(decode_status(&[0x0a, 0x50]).is_none());
    }
}
