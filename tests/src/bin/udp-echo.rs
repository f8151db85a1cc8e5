//! A UDP echo server and client for the live tests (nginx speaks no UDP).
//!
//! `udp-echo serve NAME PORT`: answers each datagram with `pod=NAME client=ADDR:PORT`.
//! `udp-echo ask ADDR:PORT COUNT [connect]`: sends COUNT requests (one socket; `connect` uses
//! connect() + send(), otherwise sendto()), prints `from=SRC <answer>` per reply, fails on a timeout.

use std::{
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
        _ => {
            eprintln!("usage: udp-echo serve NAME PORT | udp-echo ask ADDR:PORT COUNT [connect]");
            std::process::exit(2)
        }
    }
}
