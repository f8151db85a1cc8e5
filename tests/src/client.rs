//! Clients run from inside the testbed's namespaces by the test process itself: a thread enters the
//! namespace and makes the socket there (a socket keeps the namespace it was made in).

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddrV4, TcpStream},
    thread::JoinHandle,
    time::Duration,
};

use crate::testbed::answered_by;

/// Runs `f` on a thread inside network namespace `ns`.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
}

/// Opens a TCP connection from inside namespace `ns`.
pub fn connect_in(ns: &str, to: SocketAddrV4) -> TcpStream {
    in_netns(ns, move || {
        let s = TcpStream::connect_timeout(&to.into(), Duration::from_secs(3)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(3))).expect("read timeout");
        s
    })
    .join()
    .expect("connecting thread")
}

/// Sends one HTTP request on a kept-alive connection and returns the answering pod.
pub fn keepalive_request(stream: &mut TcpStream) -> String {
    stream.write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n").unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut len = 0;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap();
        }
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).unwrap();
    answered_by(&String::from_utf8_lossy(&body)).unwrap().to_owned()
}

/// One HTTP request on a new connection from the calling thread's namespace; the answering pod.
pub fn request(to: SocketAddrV4) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&to.into(), Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    if !body.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!("unexpected answer: {body}")));
    }
    Ok(answered_by(&body).map(str::to_owned).unwrap_or_default())
}
