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

/// Opens a TCP connection (the handshake completes) and aborts it at once with a RST, as a browser,
/// a health check or a scanner does: SO_LINGER with a zero timeout, then close.
pub fn connect_and_reset(to: SocketAddrV4) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let s = TcpStream::connect_timeout(&to.into(), Duration::from_secs(2))?;
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: a valid socket and a linger struct of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Sends TCP SYNs with any source address (a raw socket: nothing of the calling namespace's own TCP
/// stack is involved), `from(i)` → `to` for i in `0..count`, at most `per_second` a second. The
/// caller's thread must be inside the namespace to send from.
pub fn send_syns(
    from: impl Fn(u32) -> SocketAddrV4,
    to: SocketAddrV4,
    count: u32,
    per_second: u32,
) -> std::io::Result<()> {
    // SAFETY: plain socket creation; the descriptor is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let dst = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(to.ip().octets()) },
        sin_zero: [0; 8],
    };
    let started = std::time::Instant::now();
    let mut result = Ok(());
    for i in 0..count {
        let src = from(i);
        let mut packet = Vec::with_capacity(40);
        etherparse::PacketBuilder::ipv4(src.ip().octets(), to.ip().octets(), 64)
            .tcp(src.port(), to.port(), 0x1000_0000 ^ i, 64_240)
            .syn()
            .write(&mut packet, &[])
            .expect("a SYN");
        // SAFETY: a valid buffer and address of the sizes passed.
        let rc = unsafe {
            libc::sendto(
                fd,
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&raw const dst).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            result = Err(std::io::Error::last_os_error());
            break;
        }
        // Bounded rate: ahead of schedule, wait.
        let due = Duration::from_secs_f64(f64::from(i + 1) / f64::from(per_second));
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    // SAFETY: the descriptor opened above.
    unsafe { libc::close(fd) };
    result
}

/// One datagram to `to` on a connected UDP socket from the calling thread's namespace, and the
/// answer: `Err` with `ConnectionRefused` when an ICMP port unreachable about it came back.
pub fn udp_exchange(to: SocketAddrV4) -> std::io::Result<Vec<u8>> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
    s.connect(to)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.send(b"probe")?;
    let mut buf = [0u8; 1500];
    let n = s.recv(&mut buf)?;
    Ok(buf[..n].to_vec())
}
