//! A UDP echo server and client for the live tests (nginx speaks no UDP).
//!
//! `udp-echo serve NAME PORT`: answers each datagram with `pod=NAME client=ADDR:PORT`.
//! `udp-echo ask ADDR:PORT COUNT [connect]`: sends COUNT requests (one socket; `connect` uses
//! connect() + send(), otherwise sendto()), prints `from=SRC <answer>` per reply, fails on a timeout.
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
            let mut buf = [0u8; 1500];
            loop {
                let (_, peer) = sock.recv_from(&mut buf)?;
                sock.send_to(format!("pod={} client={peer}\n", args[2]).as_bytes(), peer)?;
            }
        }
        Some("ask") => {
            let to: SocketAddr = args[2].parse().expect("ADDR:PORT");
            let count: usize = args[3].parse().expect("COUNT");
            let connect = args.get(4).is_some_and(|a| a == "connect");
            let sock = UdpSocket::bind("0.0.0.0:0")?;
            sock.set_read_timeout(Some(Duration::from_secs(2)))?;
            if connect {
                sock.connect(to)?;
            }
            let mut buf = [0u8; 1500];
            for i in 0..count {
                let msg = format!("request {i}");
                if connect {
                    sock.send(msg.as_bytes())?
                } else {
                    sock.send_to(msg.as_bytes(), to)?
                };
                let (n, from) = sock.recv_from(&mut buf)?;
                let peer = if connect { sock.peer_addr()?.to_string() } else { String::from("-") };
                print!("from={from} peer={peer} {}", String::from_utf8_lossy(&buf[..n]));
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
                "usage: udp-echo serve NAME PORT | udp-echo ask ADDR:PORT COUNT [connect] | udp-echo stream ADDR:PORT"
            );
            std::process::exit(2)
        }
    }
}
