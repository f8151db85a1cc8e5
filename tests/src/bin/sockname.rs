//! What a socket says its peer is, for the live tests: `sockname tcp|udp ADDR:PORT` connects (a UDP
//! socket with connect()) and prints `peer=<getpeername()>`. Socket-level load balancing rewrites the
//! destination at connect(); the peer an application sees must still be the address it connected to.

use std::net::{SocketAddr, TcpStream, UdpSocket};

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let to: SocketAddr = args.get(2).and_then(|a| a.parse().ok()).expect("usage: sockname tcp|udp ADDR:PORT");
    let peer = match args.get(1).map(String::as_str) {
        Some("tcp") => TcpStream::connect_timeout(&to, std::time::Duration::from_secs(3))?.peer_addr()?,
        Some("udp") => {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.connect(to)?;
            s.peer_addr()?
        }
        _ => panic!("usage: sockname tcp|udp ADDR:PORT"),
    };
    println!("peer={peer}");
    Ok(())
}
