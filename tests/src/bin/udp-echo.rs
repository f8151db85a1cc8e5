//! A UDP echo server and client for the live tests (nginx speaks no UDP).
//!
//! `udp-echo serve NAME PORT`: answers each datagram with `pod=NAME client=ADDR:PORT`, padded to the
//! question's size when the question is larger (a large question gets an answer as large: DNS with
//! EDNS, in IP fragments).
//! `udp-echo ask ADDR:PORT COUNT [connect] [bytes=N]`: sends COUNT requests of N bytes (default: a
//! short line; one socket; `connect` uses connect() + send(), otherwise sendto()), prints
//! `from=SRC peer=PEER bytes=M <answer's first line>` per reply, fails on a timeout.
//! `udp-echo stream ADDR:PORT`: one connected socket kept for the whole run; for every line on stdin
//! sends one request and prints the answer, or `timeout` when none came within 500 ms.

use std::{
    io::{ErrorKind, Write as _},
    net::{SocketAddr, UdpSocket},
    time::Duration,
};

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("serve") => {
            let sock = UdpSocket::bind(("0.0.0.0", args[3].parse::<u16>().expect("port")))?;
            let mut buf = vec![0u8; 65_536];
            loop {
                let (n, peer) = sock.recv_from(&mut buf)?;
                let mut answer = format!("pod={} client={peer}\n", args[2]).into_bytes();
                if n > answer.len() {
                    answer.resize(n, b'.');
                }
                sock.send_to(&answer, peer)?;
            }
        }
        Some("ask") => {
            let to: SocketAddr = args[2].parse().expect("ADDR:PORT");
            let count: usize = args[3].parse().expect("COUNT");
            let connect = args[4..].iter().any(|a| a == "connect");
            let bytes: Option<usize> =
                args[4..].iter().find_map(|a| a.strip_prefix("bytes=")).map(|n| n.parse().expect("bytes=N"));
            let sock = UdpSocket::bind("0.0.0.0:0")?;
            sock.set_read_timeout(Some(Duration::from_secs(2)))?;
            if connect {
                sock.connect(to)?;
            }
            let mut buf = vec![0u8; 65_536];
            for i in 0..count {
                let mut msg = format!("request {i}\n").into_bytes();
                if let Some(n) = bytes {
                    msg.resize(n, b'?');
                }
                if connect {
                    sock.send(&msg)?
                } else {
                    sock.send_to(&msg, to)?
                };
                let (n, from) = sock.recv_from(&mut buf)?;
                let peer = if connect { sock.peer_addr()?.to_string() } else { String::from("-") };
                let first_line = String::from_utf8_lossy(&buf[..n]).lines().next().unwrap_or_default().to_owned();
                println!("from={from} peer={peer} bytes={n} {first_line}");
            }
            Ok(())
        }
        Some("stream") => {
            let to: SocketAddr = args[2].parse().expect("ADDR:PORT");
            let sock = UdpSocket::bind("0.0.0.0:0")?;
            sock.set_read_timeout(Some(Duration::from_millis(500)))?;
            sock.connect(to)?;
            let mut buf = [0u8; 1500];
            let mut out = std::io::stdout();
            for line in std::io::stdin().lines() {
                sock.send(line?.as_bytes())?;
                // Answers to earlier, timed-out requests may still arrive: keep the newest.
                let answer = match sock.recv(&mut buf) {
                    Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => "timeout\n".into(),
                    Err(e) => format!("error {e}\n"),
                };
                out.write_all(answer.as_bytes())?;
                out.flush()?;
            }
            Ok(())
        }
        _ => {
            eprintln!(
                "usage: udp-echo serve NAME PORT | udp-echo ask ADDR:PORT COUNT [connect] [bytes=N] | udp-echo stream ADDR:PORT"
            );
            std::process::exit(2)
        }
    }
}
